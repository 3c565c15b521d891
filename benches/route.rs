//! `shard_for`: the owner of a conversation, computed on every subscribe and publish.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};

fn route(c: &mut Criterion) {
    let keys: Vec<String> = (0..1024)
        .map(|i| format!("tenant-{}:c:conversation-{i}", i % 13))
        .collect();
    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(keys.len() as u64));
    g.bench_function("shard_for/8 shards", |b| {
        b.iter(|| {
            keys.iter()
                .map(|k| fanfare::route::shard_for(k.as_bytes(), 8))
                .sum::<usize>()
        })
    });
    g.finish();
}

criterion_group!(benches, route);
criterion_main!(benches);
