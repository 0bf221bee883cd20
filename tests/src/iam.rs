//! What the functions call on AWS, recorded from the SDK itself, so that the
//! template's IAM policies can be held to it (tests/tests/contract/iam_policies.rs).

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::BeforeSerializationInterceptorContextRef;
use aws_smithy_runtime_api::client::orchestrator::Metadata;
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;

/// One call as IAM sees it: `service:Operation` on a resource kind
/// (`table`, `index/<name>`, or a secret's label).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Call {
    pub action: String,
    pub resource: String,
}

/// An SDK interceptor that records every operation a client sends.
#[derive(Debug, Clone, Default)]
pub struct CallRecorder {
    calls: Arc<Mutex<BTreeSet<Call>>>,
    /// What a call on this client touches when the input does not say more
    /// (the table, or the label of the one secret it reads).
    resource: Arc<str>,
}

impl CallRecorder {
    pub fn new(resource: &str) -> Self {
        Self {
            calls: Arc::default(),
            resource: resource.into(),
        }
    }

    /// A recorder that shares this one's list but labels its calls `resource`.
    pub fn labelled(&self, resource: &str) -> Self {
        Self {
            calls: Arc::clone(&self.calls),
            resource: resource.into(),
        }
    }

    pub fn calls(&self) -> BTreeSet<Call> {
        self.calls.lock().unwrap().clone()
    }
}

impl Intercept for CallRecorder {
    fn name(&self) -> &'static str {
        "CallRecorder"
    }

    fn read_before_serialization(
        &self,
        context: &BeforeSerializationInterceptorContextRef<'_>,
        _runtime_components: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        // The operation's metadata is in the bag from this hook on.
        let Some(metadata) = cfg.load::<Metadata>() else {
            return Ok(());
        };
        let service = metadata.service().to_lowercase().replace(' ', "");
        let index = context
            .input()
            .downcast_ref::<aws_sdk_dynamodb::operation::query::QueryInput>()
            .and_then(|input| input.index_name());
        let resource = match index {
            Some(index) => format!("index/{index}"),
            None => self.resource.to_string(),
        };
        self.calls.lock().unwrap().insert(Call {
            action: format!("{service}:{}", metadata.name()),
            resource,
        });
        Ok(())
    }
}

/// A DynamoDB client for the emulator that records its calls.
pub fn recorded_dynamodb_client(recorder: &CallRecorder) -> aws_sdk_dynamodb::Client {
    let config = crate::dynamodb_client()
        .config()
        .to_builder()
        .interceptor(recorder.clone())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

/// A Secrets Manager client for the emulator, with static test credentials,
/// that records its calls (pass `None` for a plain one).
pub fn secrets_client(recorder: Option<&CallRecorder>) -> aws_sdk_secretsmanager::Client {
    use aws_sdk_secretsmanager::config::{BehaviorVersion, Credentials, Region};
    let mut config = aws_sdk_secretsmanager::Config::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(Region::new("us-east-1"))
        .endpoint_url(crate::emulator_endpoint())
        .credentials_provider(Credentials::new(
            "test",
            "test",
            None,
            None,
            "rollcall-tests",
        ));
    if let Some(recorder) = recorder {
        config = config.interceptor(recorder.clone());
    }
    aws_sdk_secretsmanager::Client::from_conf(config.build())
}
