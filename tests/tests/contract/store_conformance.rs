//! The store conformance suite against both backends: the embedded SQLite
//! store and DynamoDB on the emulator.

mod sqlite {
    rollcall_tests::conformance_cases!(rollcall_tests::sqlite_backend());
}

mod dynamodb {
    rollcall_tests::conformance_cases!(
        #[ignore = "needs the AWS emulator: scripts/test starts it and runs ignored tests"]
        rollcall_tests::dynamodb_backend()
    );
}

/// Every `pub async fn <case>(backend: &Backend)` in the suite is run.
#[test]
fn every_case_of_the_suite_is_run() {
    let source = include_str!("../../src/conformance.rs");
    let defined: Vec<&str> = source
        .split("pub async fn ")
        .skip(1)
        .filter_map(|rest| rest.split_once("(backend: &Backend)"))
        .map(|(name, _)| name)
        .filter(|name| {
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
        .collect();
    assert!(!defined.is_empty());
    let mut missing: Vec<&str> = defined
        .iter()
        .copied()
        .filter(|name| !sqlite::CASES.contains(name))
        .collect();
    missing.sort_unstable();
    assert!(
        missing.is_empty(),
        "conformance cases defined but never run: {missing:?}"
    );
    assert_eq!(sqlite::CASES, dynamodb::CASES);
}
