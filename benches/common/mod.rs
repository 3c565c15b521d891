//! What the single-core benches share: a `Shard` on a one-peer mesh, built inside a glommio
//! executor, with the default configuration and no broker.
use std::rc::Rc;
use std::sync::Arc;

use fanfare::mesh::{Mesh, Message};
use fanfare::shard::Shard;
use glommio::channels::channel_mesh::{Full, MeshBuilder, Receivers};

/// Must be awaited inside a glommio executor; keep the receivers alive as long as the shard.
pub async fn single_core_shard() -> (Rc<Shard>, Receivers<Message>) {
    let (senders, receivers) = MeshBuilder::<Message, Full>::full(1, 16)
        .join()
        .await
        .expect("mesh");
    let config = Arc::new(fanfare::config::Config::default());
    let verifier = Arc::new(fanfare::auth::Verifier::new(&config.auth).expect("verifier"));
    let shard = Shard::new(
        Mesh::new(senders, 16),
        config,
        verifier,
        fanfare::metrics::registry(1),
        None,
        "bench".into(),
    );
    (Rc::new(shard), receivers)
}
