//! A router served inside the test process on an ephemeral loopback port,
//! through the same `serve_http` the binaries use (as mini-redis's tests
//! start their server in-process): no pre-built binary, nothing stale.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Ingest's router on the SQLite file `db`, with `secrets` as
/// `ROLLCALL_FLEET_SECRETS` gives them (`kid=hex[,kid2=hex]`).
pub fn ingest_router(db: &Path, secrets: &str) -> axum::Router {
    let keyring = rollcall::verify::Keyring::parse(secrets).expect("fleet secrets");
    rollcall_ingest::router(Arc::new(rollcall_ingest::Ingest {
        keyring: rollcall_ingest::keys::KeySource::fixed(keyring),
        deadlines: rollcall::record::Deadlines::default(),
        history_retention_s: rollcall::store::DEFAULT_HISTORY_RETENTION_S,
        store: open_sqlite(db),
    }))
}

/// Query's router on the SQLite file `db`, with `tokens` as
/// `ROLLCALL_QUERY_TOKENS` gives them (`token[,token2]`).
pub fn query_router(db: &Path, tokens: &str) -> axum::Router {
    let tokens = rollcall_query::Tokens::parse(tokens).expect("query tokens");
    let cursor_key: Vec<u8> = (0..32).collect();
    let api = rollcall_query::QueryApi::new(
        rollcall::secrets::Secret::fixed(tokens),
        rollcall::secrets::Secret::fixed(cursor_key),
        open_sqlite(db),
    );
    rollcall_query::router(Arc::new(api))
}

fn open_sqlite(db: &Path) -> Arc<dyn rollcall::store::Store> {
    Arc::new(
        rollcall::store::SqliteStore::open(db, rollcall::store::Durability::Full)
            .expect("open the store"),
    )
}

pub struct InProcess {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl InProcess {
    /// Serves `router` on the current (multi-threaded) runtime.
    pub async fn serve(router: axum::Router) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind an ephemeral port");
        let addr = listener.local_addr().expect("local address");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(rollcall::api::serve_http(router, listener, async {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets open requests finish, and waits for that.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// [`crate::request`] from async code: the blocking client runs off the runtime.
pub async fn request(
    addr: SocketAddr,
    method: &'static str,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
) -> crate::Response {
    tokio::task::spawn_blocking(move || {
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        crate::request(addr, method, &path, &headers, &body)
    })
    .await
    .expect("request thread")
}
