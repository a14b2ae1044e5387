// Package forked stands for a module replaced by a local directory.
package forked

var name string

func init() {
	name = "forked"
}

// Name returns the name set by init.
func Name() string {
	return name
}
