// Command state_unknown checks that the runtime refuses to report or delete a container that
// does not exist, and prints the outcome as TAP.
package main

import (
	"fmt"
	"os"
	"os/exec"
)

func main() {
	runtimeCmd := os.Getenv("RUNTIME")
	if runtimeCmd == "" {
		runtimeCmd = "runc"
	}
	id := fmt.Sprintf("fixture-missing-%d", os.Getpid())
	fmt.Println("TAP version 13")
	fmt.Println("1..2")
	for n, verb := range []string{"state", "delete"} {
		err := exec.Command(runtimeCmd, verb, id).Run()
		if err != nil {
			fmt.Printf("ok %d - %s of an unknown container fails\n", n+1, verb)
		} else {
			fmt.Printf("not ok %d - %s of an unknown container fails\n", n+1, verb)
		}
	}
}
