module ringvectors

go 1.24

require (
	github.com/spaolacci/murmur3 v1.1.0 // indirect
	github.com/zeromicro/go-zero v1.10.0 // indirect
)
