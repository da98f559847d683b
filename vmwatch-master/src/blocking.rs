//! SQLite work of an async task (the webhook's outbox, the bus cursor) on tokio's blocking
//! threads: SQLite waits on the disk, which must not stall the runtime's workers.

use std::sync::{Arc, Mutex};

use crate::store::StoreError;

/// Runs `f` on `state` on a blocking thread. Each state belongs to one task, so the lock never
/// waits; a poisoned lock (a panic elsewhere) still hands the state over.
pub async fn blocking<S: Send + 'static, T: Send + 'static>(
    state: &Arc<Mutex<S>>,
    f: impl FnOnce(&mut S) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let state = state.clone();
    let run = move || match state.lock() {
        Ok(mut s) => f(&mut s),
        Err(poisoned) => f(&mut poisoned.into_inner()),
    };
    match tokio::task::spawn_blocking(run).await {
        Ok(r) => r,
        // spawn_blocking only fails if the closure panicked, which these never do.
        Err(e) => panic!("blocking database task failed: {e}"),
    }
}
