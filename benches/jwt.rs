//! JWT verification at the upgrade (HS256, the common case).
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn jwt(c: &mut Criterion) {
    let auth = fanfare::config::Auth {
        hs256_secret: "bench-secret".into(),
        ..Default::default()
    };
    let verifier = fanfare::auth::Verifier::new(&auth).expect("verifier");
    let now_s = fanfare::auth::now_ms() / 1000;
    let token = fanfare::auth::mint_hs256(&auth, "tenant-1", "user-1", 3600, now_s).expect("token");
    let mut g = c.benchmark_group("jwt");
    g.throughput(Throughput::Elements(1));
    g.bench_function("verify/HS256", |b| {
        b.iter(|| {
            verifier
                .verify(std::hint::black_box(&token), now_s * 1000)
                .is_ok()
        })
    });
    g.finish();
}

criterion_group!(benches, jwt);
criterion_main!(benches);
