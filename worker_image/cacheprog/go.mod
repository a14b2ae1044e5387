module kiln.dev/cacheprog

go 1.24
