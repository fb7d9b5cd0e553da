//! Microbenchmarks of the request-path pieces that depend on config size:
//! route lookup at 1, 100 and 10,000 routes (the cost must stay flat), path
//! normalization, and compiling a 10,000-route config (the reload cost).
//!
//! `cargo bench --bench router`; criterion prints the figures.

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use http::Method;
use tollgate::config::{compile::compile, parse_partial};
use tollgate::router::{normalize_path, HostPattern, PathPattern, RouteIndex, RouteIndexBuilder};
use tollgate::snapshot::Pools;

/// `n` prefix routes `/svc{i}/v1`, each on its own host when `by_host`.
fn index_of(n: usize, by_host: bool) -> RouteIndex {
    let mut builder = RouteIndexBuilder::default();
    for i in 0..n {
        let host = if by_host {
            HostPattern::Exact(format!("tenant{i}.example.com"))
        } else {
            HostPattern::Any
        };
        let path = PathPattern::Prefix(format!("/svc{i}/v1"));
        builder
            .insert(&host, &path, Some(&[Method::GET, Method::POST]), i)
            .expect("distinct routes");
    }
    builder.build()
}

/// Each request matches the last-defined route (a linear matcher's worst
/// case) and does the same work whatever the route count, so any difference
/// between sizes is the cost of size itself.
fn route_lookup(c: &mut Criterion) {
    for (group_name, by_host) in [
        ("route_lookup/any_host", false),
        ("route_lookup/by_host", true),
    ] {
        let mut group = c.benchmark_group(group_name);
        for n in [1usize, 100, 10_000] {
            let index = index_of(n, by_host);
            let last = n - 1;
            let host = format!("tenant{last}.example.com");
            let path = format!("/svc{last}/v1/items/42");
            group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
                b.iter(|| {
                    index.lookup(
                        black_box(Some(host.as_str())),
                        black_box(&path),
                        &Method::GET,
                    )
                })
            });
        }
        group.finish();
    }
}

fn path_normalization(c: &mut Criterion) {
    let mut group = c.benchmark_group("normalize_path");
    for (name, path) in [
        ("clean", "/api/users/7/orders"),
        ("dot_segments", "/api/users/../orders/./7"),
        ("escapes", "/api/%75sers/%2e%2e/orders/a%20b"),
    ] {
        group.bench_function(name, |b| {
            b.iter(|| normalize_path(black_box(path)).map(|p| p.len()))
        });
    }
    group.finish();
}

fn config_compile(c: &mut Criterion) {
    let mut text = String::from("listen: [\"127.0.0.1:8080\"]\nupstreams:\n  u: { targets: [\"127.0.0.1:9001\", \"127.0.0.1:9002\"] }\nroutes:\n");
    for i in 0..10_000 {
        text.push_str(&format!(
            "  - {{ name: r{i}, path_prefix: /svc{i}/v1, methods: [GET, POST], upstream: u, request_headers: {{ set: {{ X-Route: r{i} }} }} }}\n"
        ));
    }
    let pools = Pools::default();
    let mut group = c.benchmark_group("config_compile");
    group.sample_size(10);
    group.bench_function("10000_routes", |b| {
        b.iter(|| {
            let (file, errors) = parse_partial(&text).expect("valid YAML");
            compile(file, errors, None, &pools, std::path::Path::new("."))
                .expect("valid config")
                .snapshot
                .routes
                .len()
        })
    });
    group.finish();
}

criterion_group!(benches, route_lookup, path_normalization, config_compile);
criterion_main!(benches);
