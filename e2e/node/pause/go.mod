module tollgate.dev/e2e/node/pause

go 1.24
