//! Fan-out of one published event to N local subscribers, up to the point of the write: the
//! owner's lookup, one `Bytes` refcount bump and queue push per subscriber, and each writer
//! taking its frame off its queue.
use std::rc::Rc;
use std::task::{Context, Waker};

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use fanfare::handle::ConnHandle;
use fanfare::publish::Routed;
use fanfare::route::room_key;
use futures_lite::future::block_on;

fn fanout(c: &mut Criterion) {
    let executor = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    executor.run(async {
        let shard = common::single_core_shard().await;
        let payload = bytes::Bytes::from_static(&[b'x'; 100]);
        let mut cx = Context::from_waker(Waker::noop());
        let mut g = c.benchmark_group("fanout");
        for n in [10u64, 1_000, 10_000] {
            let room = room_key("tenant", &format!("room-{n}"));
            let conns: Vec<Rc<ConnHandle>> = (0..n)
                .map(|i| {
                    Rc::new(ConnHandle::new(
                        i,
                        "tenant".into(),
                        format!("u{i}").into(),
                        1 << 20,
                        u64::MAX,
                    ))
                })
                .collect();
            for conn in &conns {
                block_on(shard.subscribe(&room, conn, None));
            }
            g.throughput(Throughput::Elements(n));
            g.bench_function(BenchmarkId::new("deliver_100B", n), |b| {
                b.iter(|| {
                    // The owner is this core, so publishing completes without awaiting.
                    let event = Routed {
                        room: room.clone(),
                        payload: payload.clone(),
                    };
                    let _ = block_on(shard.publish(vec![event]));
                    for conn in &conns {
                        let _ = conn.poll_next(&mut cx, 64 * 1024);
                    }
                })
            });
        }
        g.finish();
    });
}

criterion_group!(benches, fanout);
criterion_main!(benches);
