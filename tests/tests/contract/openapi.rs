//! The OpenAPI documents (PROTOCOL.md §3) against the routers they describe:
//! each function serves, at `/openapi.json`, the very document its crate
//! keeps; every route the router has is in the document and every route the
//! document names answers, with the methods it names and a 405 for the
//! rest. schemathesis then checks the answers' contents (`scripts/test`).

use std::collections::BTreeSet;

use rollcall_tests::inprocess::{InProcess, ingest_router, query_router, request};
use serde_json::Value;

const TOKEN: &str = "openapi-test-token-0123456789";
const SECRETS: &str = "k1=0707070707070707070707070707070707070707070707070707070707070707";
const METHODS: [&str; 5] = ["GET", "POST", "PUT", "DELETE", "PATCH"];

/// The router's own routes, path → methods, read from its `Debug` form
/// (axum has no other way to list them). Should axum change that form, this
/// fails loudly rather than finding no routes.
fn routes_of(router: &axum::Router) -> Vec<(String, BTreeSet<String>)> {
    let text = format!("{router:?}");
    let own = text
        .split_once("fallback_router")
        .map_or(text.as_str(), |(own, _)| own);
    let (routes, node) = own
        .split_once("node: Node { paths: {")
        .expect("the router's Debug form names its paths");
    let mut found = Vec::new();
    for entry in node.split("RouteId(").skip(1) {
        let (id, rest) = entry.split_once("): \"").expect("RouteId(n): \"path\"");
        let path = rest.split('"').next().unwrap_or_default().to_owned();
        let methods = routes
            .split(&format!("RouteId({id}): MethodRouter("))
            .nth(1)
            .and_then(|route| route.split("allow_header: Bytes(b\"").nth(1))
            .and_then(|allow| allow.split('"').next())
            .unwrap_or_else(|| panic!("no allowed methods for {path} in {own}"));
        let methods = methods
            .split(',')
            .filter(|method| *method != "HEAD")
            .map(str::to_owned)
            .collect();
        found.push((path, methods));
    }
    assert!(!found.is_empty(), "no routes found in {own}");
    found.sort();
    found
}

fn document_routes(document: &Value) -> Vec<(String, BTreeSet<String>)> {
    let mut found: Vec<(String, BTreeSet<String>)> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .map(|(path, operations)| {
            let methods = operations
                .as_object()
                .expect("operations")
                .keys()
                // A path item may also hold what its operations share.
                .filter(|key| !matches!(key.as_str(), "parameters" | "summary" | "description"))
                .map(|method| method.to_ascii_uppercase())
                .collect();
            (path.clone(), methods)
        })
        .collect();
    found.sort();
    found
}

/// Serves `router`, and checks it against `document_file`: the document it
/// serves is that file, its routes are the document's, each documented
/// operation answers with a status it documents, and every other method 405.
async fn holds_to_its_document(router: axum::Router, document_file: &str) {
    let kept = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(document_file),
    )
    .unwrap();
    let document: Value = serde_json::from_str(&kept).unwrap();
    assert_eq!(document["openapi"], "3.1.0");
    let routes = routes_of(&router);
    assert_eq!(
        routes,
        document_routes(&document),
        "the router's routes (left) and {document_file}'s (right) differ"
    );

    let server = InProcess::serve(router).await;
    let auth = vec![("Authorization".to_owned(), format!("Bearer {TOKEN}"))];
    let served = request(server.addr, "GET", "/openapi.json".into(), vec![], vec![]).await;
    assert_eq!(served.status, 200);
    assert_eq!(served.header("content-type"), Some("application/json"));
    assert_eq!(served.text(), kept, "/openapi.json is not {document_file}");

    for (path, methods) in routes {
        let concrete = path.replace("{agent_id}", "nobody");
        for method in METHODS {
            let answer = request(server.addr, method, concrete.clone(), auth.clone(), vec![]).await;
            if methods.contains(method) {
                let documented =
                    &document["paths"][&path][method.to_ascii_lowercase()]["responses"];
                assert!(
                    documented.get(answer.status.to_string()).is_some(),
                    "{method} {concrete} answered {}, which {document_file} does not list: {}",
                    answer.status,
                    answer.text()
                );
            } else {
                assert_eq!(answer.status, 405, "{method} {concrete}: {}", answer.text());
                assert!(answer.json()["error"].is_string());
            }
        }
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_query_function_holds_to_its_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let router = query_router(&dir.path().join("openapi.db"), TOKEN);
    holds_to_its_document(router, "../query-fn/openapi.json").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ingest_function_holds_to_its_openapi_document() {
    let dir = tempfile::tempdir().unwrap();
    let router = ingest_router(&dir.path().join("openapi.db"), SECRETS);
    holds_to_its_document(router, "../ingest-fn/openapi.json").await;
}
