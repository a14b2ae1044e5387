// Package noinit has no init function.
package noinit

// Double returns twice n.
func Double(n int) int {
	return 2 * n
}
