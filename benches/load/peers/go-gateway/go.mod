module tollgate.bench/go-gateway

go 1.19
