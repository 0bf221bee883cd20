//! One AWS SDK configuration for every client a function builds (DynamoDB,
//! Secrets Manager): the standard chain, which honours `AWS_ENDPOINT_URL` so
//! that the same binary talks to AWS, LocalStack or ministack, with timeouts
//! that keep one stuck call from eating a Lambda invocation's whole budget.

use std::time::Duration;

static CONFIG: tokio::sync::OnceCell<aws_config::SdkConfig> = tokio::sync::OnceCell::const_new();

/// The process's one configuration, loaded on first use: every client built
/// from it (DynamoDB, Secrets Manager) shares its credentials and settings.
pub async fn sdk_config() -> &'static aws_config::SdkConfig {
    CONFIG.get_or_init(load).await
}

async fn load() -> aws_config::SdkConfig {
    aws_config::defaults(aws_config::BehaviorVersion::latest())
        .timeout_config(
            // Below ingest's 5 s function timeout: a call that times out
            // is an error the handler answers, not a killed invocation.
            aws_config::timeout::TimeoutConfig::builder()
                .operation_attempt_timeout(Duration::from_secs(2))
                .operation_timeout(Duration::from_secs(4))
                .build(),
        )
        .load()
        .await
}
