// Command runtimetest runs as the container process of the fixture suite and reports what it
// sees from inside: its pid (1 in a fresh pid namespace) and its hostname.
package main

import (
	"fmt"
	"os"
)

func main() {
	host, err := os.Hostname()
	if err != nil {
		fmt.Fprintf(os.Stderr, "runtimetest: hostname: %v\n", err)
		os.Exit(1)
	}
	fmt.Printf("runtimetest pid=%d hostname=%s\n", os.Getpid(), host)
}
