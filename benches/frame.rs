//! Building one server frame (header + payload in one allocation), done once per event.
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn frame(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for size in [100usize, 1024, 65_536] {
        let payload = vec![b'x'; size];
        g.throughput(Throughput::Bytes(size as u64));
        g.bench_with_input(BenchmarkId::new("text", size), &payload, |b, p| {
            b.iter(|| fanfare::ws::text(std::hint::black_box(p)))
        });
    }
    g.finish();
}

criterion_group!(benches, frame);
criterion_main!(benches);
