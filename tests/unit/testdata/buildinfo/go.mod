module example.com/tiny

go 1.21

require (
	example.com/forked v1.0.0
	github.com/kiln-fixtures/util v1.0.0
)

replace example.com/forked v1.0.0 => ./forked
