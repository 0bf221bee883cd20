//! The store conformance suite against both backends: the embedded SQLite
//! store and DynamoDB on the emulator.

mod sqlite {
    rollcall_tests::conformance_cases!(rollcall_tests::sqlite_backend());
}

mod dynamodb {
    rollcall_tests::conformance_cases!(rollcall_tests::dynamodb_backend());
}
