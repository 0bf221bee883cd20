//! HTTP plumbing shared by the two functions: JSON errors, the health check,
//! and the two entry points for one router (AWS Lambda or plain HTTP).

use std::net::SocketAddr;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde_json::json;

use crate::store::StoreError;

/// Seconds a client should wait after a 503 before trying again.
pub const RETRY_AFTER_S: u64 = 5;

/// An error answer: `{"error": "...", "code": "..."}` with its status
/// (`rollcall::wire::ErrorBody`).
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    /// A `rollcall::wire::code`; by default the one for the status.
    pub code: &'static str,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            code: code_for(status),
        }
    }

    pub fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, message)
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(_) => {
                tracing::warn!(%error, "store unavailable");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store unavailable; retry later",
                )
            }
            StoreError::Corrupt(_) => {
                tracing::error!(%error, "store holds an unreadable record");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal error reading the store",
                )
            }
        }
    }
}

/// The code an answer with this status carries unless a handler says more.
fn code_for(status: StatusCode) -> &'static str {
    crate::wire::code::for_status(status.as_u16())
}

/// A refused heartbeat or body (PROTOCOL.md §1) as the answer that says so.
impl From<crate::verify::Rejection> for ApiError {
    fn from(rejection: crate::verify::Rejection) -> Self {
        let status = StatusCode::from_u16(rejection.status()).unwrap_or(StatusCode::BAD_REQUEST);
        ApiError::new(status, rejection.to_string()).with_code(rejection.code())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = crate::wire::ErrorBody {
            error: self.message,
            code: self.code.to_owned(),
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// Reads a JSON request body: the content type and size of PROTOCOL.md §1
/// check 1, and a body that arrives in time. Both functions' bodies.
pub async fn read_json_body(
    headers: &axum::http::HeaderMap,
    body: axum::body::Body,
) -> Result<axum::body::Bytes, ApiError> {
    use crate::heartbeat::MAX_BODY_BYTES;
    use crate::verify::{Rejection, is_json_content_type};
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|value| value.as_bytes());
    if !is_json_content_type(content_type) {
        let shown = content_type.map_or("nothing".into(), |value| {
            format!("{:?}", String::from_utf8_lossy(value))
        });
        return Err(ApiError::from(Rejection::UnsupportedMediaType(shown)));
    }
    let declared_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared_length.is_some_and(|length| length > MAX_BODY_BYTES as u64) {
        return Err(ApiError::from(Rejection::PayloadTooLarge));
    }
    let read = tokio::time::timeout(
        BODY_READ_TIMEOUT,
        axum::body::to_bytes(body, MAX_BODY_BYTES),
    );
    read.await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "the request body did not arrive in time",
            )
        })?
        .map_err(|error| {
            if is_length_limit(&error) {
                ApiError::from(Rejection::PayloadTooLarge)
            } else {
                ApiError::bad_request(format!("could not read the request body: {error}"))
            }
        })
}

/// `to_bytes` reports its limit as `LengthLimitError` somewhere in the chain;
/// anything else is a broken body, not an oversized one.
fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = source {
        if current.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = current.source();
    }
    false
}

/// `GET /openapi.json`: the function's OpenAPI document, the very file its
/// crate keeps (`openapi.json`, compiled in), so the two cannot differ.
pub fn openapi_json(document: &'static str) -> Response {
    ([(header::CONTENT_TYPE, "application/json")], document).into_response()
}

/// `GET /healthz`: no authentication and no store access, so it says only
/// that the process answers.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "ok": true }))
}

/// On every answer of both functions: no content sniffing (a JSON error
/// quoting a client's text is never taken for HTML), and no caching of
/// answers that hold fleet data or sit behind a bearer token.
pub async fn no_sniff_no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// What every function's router ends with, added after its own routes:
/// `/healthz`, `/openapi.json` (its `document`), JSON 404 and 405 answers
/// (`allowed` names the methods to use instead of the one asked with), and
/// the headers of [`no_sniff_no_store`] on every answer.
pub fn common_routes<S: Clone + Send + Sync + 'static>(
    router: Router<S>,
    document: &'static str,
    allowed: fn(&Method) -> &'static str,
) -> Router<S> {
    router
        .route("/healthz", get(healthz))
        .route(
            "/openapi.json",
            get(move || async move { openapi_json(document) }),
        )
        .method_not_allowed_fallback(move |method: Method| async move {
            method_not_allowed(allowed(&method))
        })
        .fallback(not_found)
        .layer(axum::middleware::map_response(no_sniff_no_store))
}

/// Fallback for paths this function does not serve.
pub async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no such endpoint: {}", uri.path()))
}

/// A JSON 405 for a known path asked with the wrong method.
pub fn method_not_allowed(allowed: &'static str) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("method not allowed; use {allowed}"),
    )
}

/// True when running inside AWS Lambda (or an emulator of it).
pub fn in_lambda() -> bool {
    std::env::var_os("AWS_LAMBDA_RUNTIME_API").is_some()
}

/// A client must send its request headers within this time, or the
/// connection is closed: slow or silent clients cannot pin connections.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// A handler that reads a body gives up on it after this time (408).
pub const BODY_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections still open at shutdown get this long to finish.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves `router` through the Lambda Runtime API when inside Lambda, else as
/// plain HTTP/1.1 on `listen` until SIGINT or SIGTERM.
pub async fn serve(router: Router, listen: SocketAddr, name: &str) -> Result<(), ServeError> {
    if in_lambda() {
        tracing::info!("{name}: serving through the Lambda Runtime API");
        return lambda_http::run(router)
            .await
            .map_err(|e| ServeError::Lambda(e.to_string()));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind { listen, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| ServeError::Bind { listen, source })?;
    tracing::info!("{name}: listening on http://{local}");
    serve_http(router, listener, shutdown_signal()).await;
    tracing::info!("{name}: stopped");
    Ok(())
}

/// The plain-HTTP server: hyper's HTTP/1.1 with a header read timeout (which
/// `axum::serve` does not set), and a graceful drain on `shutdown`.
pub async fn serve_http(
    router: Router,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()>,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _)) => stream,
                    Err(error) => {
                        // Out of file descriptors and the like: pause rather than spin.
                        tracing::warn!(%error, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = TowerToHyperService::new(router.clone());
                let mut stopping = stopping.clone();
                connections.spawn(async move {
                    let stop_requested = async move {
                        let _ = stopping.wait_for(|stop| *stop).await;
                    };
                    let connection = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::pin!(connection);
                    tokio::select! {
                        result = connection.as_mut() => {
                            if let Err(error) = result {
                                tracing::debug!(%error, "connection closed with an error");
                            }
                        }
                        () = stop_requested => {
                            connection.as_mut().graceful_shutdown();
                            let _ = connection.await;
                        }
                    }
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    let _ = stop.send(true);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = connections.len(),
            "connections still open after the drain timeout; closing them"
        );
        connections.abort_all();
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot listen on {listen}: {source}")]
    Bind {
        listen: SocketAddr,
        source: std::io::Error,
    },
    #[error("Lambda runtime failed: {0}")]
    Lambda(String),
}

async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
