//! The cost of one presence change in a tenant of 10,000 connected users: the owner's
//! broadcast reaching this core, the replica update, and one queue push per connection of the
//! tenant (each writer then taking its frame off its queue).
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Waker};

mod common;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanfare::handle::ConnHandle;
use fanfare::mesh::Message;
use futures_lite::future::block_on;

const USERS: u64 = 10_000;

fn presence(c: &mut Criterion) {
    let executor = glommio::LocalExecutorBuilder::default()
        .make()
        .expect("executor");
    executor.run(async {
        let shard = common::single_core_shard().await;
        let mut cx = Context::from_waker(Waker::noop());
        let tenant: Arc<str> = "tenant".into();
        let conns: Vec<Rc<ConnHandle>> = (0..USERS)
            .map(|i| {
                Rc::new(ConnHandle::new(
                    i,
                    tenant.clone(),
                    format!("u{i}").into(),
                    1 << 20,
                    u64::MAX,
                ))
            })
            .collect();
        let drain = |conns: &[Rc<ConnHandle>], cx: &mut Context<'_>| {
            for conn in conns {
                while conn.poll_next(cx, 1 << 20).is_ready() {}
            }
        };
        // Setting up is itself the reconnect storm: N online events to up to N connections.
        for (i, conn) in conns.iter().enumerate() {
            block_on(shard.register(conn.clone()));
            if i % 256 == 0 {
                drain(&conns, &mut cx);
            }
        }
        drain(&conns, &mut cx);
        let user = (tenant.clone(), Arc::<str>::from("newcomer"));
        let frame = fanfare::ws::text(br#"{"type":"presence.online","userId":"newcomer"}"#);
        let mut online = true;
        let mut g = c.benchmark_group("presence");
        g.throughput(Throughput::Elements(USERS));
        g.bench_function("change/10k_users", |b| {
            b.iter(|| {
                shard.handle(Message::Presence {
                    user: user.clone(),
                    online,
                    frame: frame.clone(),
                });
                online = !online;
                drain(&conns, &mut cx);
            })
        });
        g.finish();
    });
}

criterion_group!(benches, presence);
criterion_main!(benches);
