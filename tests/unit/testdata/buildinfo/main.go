// Command tiny is a small Go program whose build information Kiln's tests read.
package main

import (
	"fmt"

	"example.com/forked"
	"example.com/tiny/noinit"
	sub "example.com/tiny/sub.v2"
	"github.com/kiln-fixtures/util"
)

func main() {
	fmt.Println(util.Greeting(forked.Name()), sub.Registered(), noinit.Double(2))
}
