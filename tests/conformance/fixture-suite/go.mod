module example.invalid/kata-conformance-fixture

go 1.19
