//! A recovery answered from the owner core's hot cache: the 100 frames after a client's
//! `since`, out of a conversation that keeps 1000 (a refcount bump each), and appending one
//! published event with its offset (the frame built once, kept in the ring).
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanfare::history::{History, Position};

fn replay(c: &mut Criterion) {
    let room: fanfare::route::RoomKey = "tenant:c:conversation".into();
    let mut history = History::new(1000, Duration::from_secs(3600), true);
    let now = Instant::now();
    let payload = br#"{"type":"conversation.updated","conversationId":"conversation","pad":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#;
    let mut at = Position {
        epoch: 0,
        offset: 0,
    };
    for _ in 0..1000 {
        at = history.append(&room, payload, now).1;
    }
    let since = Position {
        offset: at.offset - 100,
        ..at
    };
    let mut g = c.benchmark_group("history");
    g.throughput(Throughput::Elements(100));
    g.bench_function("replay 100 of 1000 kept", |b| {
        b.iter(|| {
            let read = history.read(&room, since, now).expect("kept");
            read.events.map(|e| e.len()).unwrap_or(0)
        })
    });
    g.throughput(Throughput::Elements(1));
    g.bench_function("append 100 B with its offset", |b| {
        b.iter(|| history.append(&room, payload, now).1.offset)
    });
    g.finish();
}

criterion_group!(benches, replay);
criterion_main!(benches);
