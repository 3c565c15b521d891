//! Parsing client events in place with simd-json (the copy of the frame is part of the cost:
//! the connection parses a buffer it owns).
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};

fn parse(c: &mut Criterion) {
    let events = [
        (
            "subscribe",
            r#"{"type":"subscribe","conversationId":"conversation-1234","id":"req-17"}"#,
        ),
        ("ping", r#"{"type":"ping"}"#),
        (
            "invalid",
            r#"{"type":"subscribe","conversationId":"has space","id":"x"}"#,
        ),
    ];
    let mut g = c.benchmark_group("parse");
    for (name, text) in events {
        g.throughput(Throughput::Bytes(text.len() as u64));
        g.bench_with_input(BenchmarkId::new("client_event", name), text, |b, t| {
            b.iter(|| {
                let mut buf = t.as_bytes().to_vec();
                let ok = fanfare::protocol::parse_client_event(&mut buf).is_ok();
                std::hint::black_box(ok)
            })
        });
    }
    g.finish();
}

criterion_group!(benches, parse);
criterion_main!(benches);
