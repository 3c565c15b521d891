//! What the single-core benches share: a `Shard` on a one-core mesh, built inside a glommio
//! executor, with the default configuration and no broker.
use std::rc::Rc;
use std::sync::Arc;

use fanfare::mesh::{Mesh, Wiring};
use fanfare::shard::Shard;

/// Must be awaited inside a glommio executor.
pub async fn single_core_shard() -> Rc<Shard> {
    let ends = Wiring::new(1, 16).take().expect("one core's ends");
    let (mesh, _) = Mesh::connect(ends, 16).await;
    let config = Arc::new(fanfare::config::Config::default());
    let verifier = Arc::new(fanfare::auth::Verifier::new(&config.auth).expect("verifier"));
    let shard = Shard::new(
        mesh,
        config,
        verifier,
        fanfare::metrics::registry(1),
        None,
        "bench".into(),
    );
    Rc::new(shard)
}
