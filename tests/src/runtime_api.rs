//! A loopback stand-in for the AWS Lambda Runtime API (2018-06-01), so the
//! compiled `bootstrap` can be driven through its real Lambda code path
//! without AWS: it hands out queued events on `invocation/next` and collects
//! what the function posts back.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

/// What the function posted for one invocation.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub request_id: String,
    /// `response` or `error`.
    pub kind: String,
    pub body: Value,
    /// From handing out the event to receiving the answer.
    pub took: Duration,
    pub answered_at: Instant,
}

#[derive(Default)]
struct State {
    events: VecDeque<(String, Value)>,
    handed_out: Vec<(String, Instant)>,
    outcomes: Vec<Outcome>,
    init_errors: Vec<String>,
}

#[derive(Clone)]
pub struct RuntimeApi {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
}

impl RuntimeApi {
    pub fn start() -> RuntimeApi {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind runtime API");
        let addr = listener.local_addr().unwrap();
        let api = RuntimeApi {
            addr,
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
        };
        let server = api.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                let server = server.clone();
                std::thread::spawn(move || server.serve(stream));
            }
        });
        api
    }

    /// Queues an event; returns its request id.
    pub fn push(&self, event: Value) -> String {
        let (lock, wake) = &*self.state;
        let mut state = lock.lock().unwrap();
        let id = format!("req-{}", state.handed_out.len() + state.events.len() + 1);
        state.events.push_back((id.clone(), event));
        wake.notify_all();
        id
    }

    /// Waits for the outcome of `request_id`.
    pub fn wait(&self, request_id: &str, limit: Duration) -> Outcome {
        let (lock, wake) = &*self.state;
        let deadline = Instant::now() + limit;
        let mut state = lock.lock().unwrap();
        loop {
            if let Some(outcome) = state.outcomes.iter().find(|o| o.request_id == request_id) {
                return outcome.clone();
            }
            assert!(
                state.init_errors.is_empty(),
                "function failed to start: {:?}",
                state.init_errors
            );
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no answer to {request_id} within {limit:?}"
            );
            state = wake.wait_timeout(state, left).unwrap().0;
        }
    }

    /// Pushes an event and waits for its outcome.
    pub fn invoke(&self, event: Value) -> Outcome {
        let id = self.push(event);
        self.wait(&id, Duration::from_secs(30))
    }

    fn serve(&self, stream: TcpStream) {
        let mut reader = BufReader::new(stream.try_clone().expect("clone stream"));
        let mut writer = stream;
        loop {
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
                return;
            }
            let mut length = 0usize;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                let line = line.trim_end();
                if line.is_empty() {
                    break;
                }
                if let Some((name, value)) = line.split_once(':')
                    && name.eq_ignore_ascii_case("content-length")
                {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            if reader.read_exact(&mut body).is_err() {
                return;
            }
            let mut parts = request_line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let reply = self.handle(method, path, &body);
            if writer.write_all(&reply).is_err() {
                return;
            }
        }
    }

    fn handle(&self, method: &str, path: &str, body: &[u8]) -> Vec<u8> {
        let (lock, wake) = &*self.state;
        let path = path.strip_prefix("/2018-06-01/runtime").unwrap_or(path);
        if method == "GET" && path == "/invocation/next" {
            let mut state = lock.lock().unwrap();
            let (id, event) = loop {
                if let Some(next) = state.events.pop_front() {
                    break next;
                }
                state = wake.wait(state).unwrap();
            };
            state.handed_out.push((id.clone(), Instant::now()));
            drop(state);
            let deadline = rollcall::time::now_ms() + 30_000;
            let payload = event.to_string();
            return format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nLambda-Runtime-Aws-Request-Id: {id}\r\n\
                 Lambda-Runtime-Deadline-Ms: {deadline}\r\n\
                 Lambda-Runtime-Invoked-Function-Arn: arn:aws:lambda:us-east-1:000000000000:function:rollcall\r\n\
                 Lambda-Runtime-Trace-Id: Root=1-00000000-000000000000000000000000;Sampled=0\r\n\
                 Content-Length: {}\r\n\r\n{payload}",
                payload.len()
            )
            .into_bytes();
        }
        let mut state = lock.lock().unwrap();
        if path == "/init/error" {
            state
                .init_errors
                .push(String::from_utf8_lossy(body).into_owned());
        } else if let Some(rest) = path.strip_prefix("/invocation/") {
            let (id, kind) = rest.split_once('/').unwrap_or((rest, ""));
            let started = state
                .handed_out
                .iter()
                .find(|(handed, _)| handed == id)
                .map(|(_, at)| *at);
            let now = Instant::now();
            state.outcomes.push(Outcome {
                request_id: id.to_owned(),
                kind: kind.to_owned(),
                body: serde_json::from_slice(body).unwrap_or(Value::Null),
                took: started.map(|at| now - at).unwrap_or_default(),
                answered_at: now,
            });
        }
        wake.notify_all();
        b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{\"status\":\"OK\"}\n".to_vec()
    }
}

/// A function-URL / API Gateway HTTP API (payload 2.0) event.
pub fn http_event(
    method: &str,
    path: &str,
    query: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
    base64: bool,
) -> Value {
    let header_map: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(name, value)| {
            (
                name.to_ascii_lowercase(),
                Value::String((*value).to_owned()),
            )
        })
        .collect();
    let mut event = serde_json::json!({
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": query,
        "headers": header_map,
        "requestContext": {
            "accountId": "000000000000",
            "apiId": "rollcall",
            "domainName": "rollcall.lambda-url.us-east-1.on.aws",
            "domainPrefix": "rollcall",
            "http": {"method": method, "path": path, "protocol": "HTTP/1.1", "sourceIp": "127.0.0.1", "userAgent": "harness"},
            "requestId": "harness",
            "routeKey": "$default",
            "stage": "$default",
            "time": "26/Nov/2026:05:00:00 +0000",
            "timeEpoch": 1_795_669_200_000u64
        },
        "isBase64Encoded": base64
    });
    if let Some(body) = body {
        event["body"] = Value::String(if base64 {
            BASE64.encode(body)
        } else {
            String::from_utf8_lossy(body).into_owned()
        });
    }
    event
}

/// The answer body of an HTTP response event, decoded.
pub fn response_body(outcome: &Outcome) -> Value {
    let body = outcome.body["body"].as_str().unwrap_or("");
    let bytes = if outcome.body["isBase64Encoded"].as_bool() == Some(true) {
        BASE64.decode(body).unwrap_or_default()
    } else {
        body.as_bytes().to_vec()
    };
    serde_json::from_slice(&bytes).unwrap_or(Value::Null)
}
