//! One cross-core hop: a `Deliver` message posted through the mesh's outbox (`Mesh::post`, the
//! path every cross-core message takes) from one executor to another, measured as half of a
//! round trip.
use std::sync::mpsc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use fanfare::mesh::{Fanned, Mesh, Message, Wiring};
use fanfare::route::room_key;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

fn mesh_hop(c: &mut Criterion) {
    let wiring = std::sync::Arc::new(Wiring::new(2, 1024));
    let (ask_tx, ask_rx) = mpsc::channel::<u64>();
    let (done_tx, done_rx) = mpsc::channel::<Duration>();
    let ask_rx = std::sync::Arc::new(std::sync::Mutex::new(Some(ask_rx)));
    let pool =
        LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(2, glommio::CpuSet::online().ok()))
            .on_all_shards(move || {
                let (ends, ask_rx, done_tx) = (wiring.take(), ask_rx.clone(), done_tx.clone());
                async move {
                    let (tx, inbound) = Mesh::connect(ends.expect("ends"), 1024).await;
                    let me = tx.id();
                    let peer = 1 - me;
                    let rx = &inbound[0];
                    tx.start(&fanfare::metrics::registry(2));
                    let ask = ask_rx
                        .lock()
                        .ok()
                        .and_then(|mut a| if me == 0 { a.take() } else { None });
                    let room = room_key("tenant", "room");
                    let out = Fanned::event(fanfare::ws::text(&[b'x'; 100]), None);
                    match ask {
                        // The driver: N round trips per request from criterion.
                        Some(ask) => {
                            while let Ok(n) = ask.recv() {
                                let start = Instant::now();
                                for _ in 0..n {
                                    tx.post(
                                        peer,
                                        Message::Deliver {
                                            room: room.clone(),
                                            out: out.clone(),
                                        },
                                    );
                                    let _ = rx.recv().await;
                                }
                                let _ = done_tx.send(start.elapsed());
                            }
                            // Anything but a delivery tells the echo to stop.
                            tx.post(peer, Message::Reannounce);
                        }
                        // The echo: sends every delivery back.
                        None => {
                            while let Some(msg @ Message::Deliver { .. }) = rx.recv().await {
                                tx.post(peer, msg);
                            }
                        }
                    }
                }
            })
            .expect("executors");
    let mut g = c.benchmark_group("mesh");
    g.throughput(Throughput::Elements(1));
    g.bench_function("hop", |b| {
        b.iter_custom(|iters| {
            ask_tx.send(iters).expect("driver alive");
            // Two hops per round trip.
            done_rx.recv().expect("driver answers") / 2
        })
    });
    g.finish();
    drop(ask_tx);
    let _ = pool.join_all();
}

criterion_group!(benches, mesh_hop);
criterion_main!(benches);
