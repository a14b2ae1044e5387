// Package sub has a dot in its directory name and registers itself from init, as a
// Caddy plugin does.
package sub

var registered []string

func init() {
	registered = append(registered, "sub.v2")
}

// Registered returns what init registered.
func Registered() []string {
	return registered
}
