module github.com/pggovernor/pggovernor/bench/gnetspike

go 1.26.8

// The relay engine spike's gnet side (bench/README.md, "Relay engine
// spike"): a module of its own so that gnet stays out of the product's and
// the benchmark harness's dependencies. It uses the product's
// internal/relaybench from the work tree it is in.
replace github.com/pggovernor/pggovernor => ../..

require (
	github.com/panjf2000/gnet/v2 v2.9.7
	github.com/pggovernor/pggovernor v0.0.0-00010101000000-000000000000
)

require (
	github.com/aws/aws-sdk-go-v2 v1.48.0 // indirect
	github.com/aws/smithy-go v1.28.9 // indirect
	github.com/jackc/pgpassfile v1.0.0 // indirect
	github.com/jackc/pgservicefile v0.0.0-20240606120523-5a60cdf6a761 // indirect
	github.com/jackc/pgx/v5 v5.12.0 // indirect
	github.com/panjf2000/ants/v2 v2.11.3 // indirect
	github.com/valyala/bytebufferpool v1.0.0 // indirect
	go.uber.org/multierr v1.11.0 // indirect
	go.uber.org/zap v1.28.0 // indirect
	golang.org/x/sync v0.23.0 // indirect
	golang.org/x/sys v0.48.0 // indirect
	golang.org/x/text v0.42.0 // indirect
	gopkg.in/natefinch/lumberjack.v2 v2.2.1 // indirect
)
