//! The names rollcall accepts, one rule each for every crate: agent ids,
//! key ids, pools, label keys and label values. The collector checks its
//! configuration with these at start-up, ingest checks heartbeats, and the
//! query function checks filters and claims, so that what one end accepts
//! the other never refuses.

/// The agent-id and key-id alphabet: `A-Z a-z 0-9 . _ -`.
pub fn is_id_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')
}

/// 1–`max` characters of the id alphabet.
pub fn is_valid_id(text: &str, max: usize) -> bool {
    !text.is_empty() && text.len() <= max && text.chars().all(is_id_char)
}

/// What [`is_valid_id`] asks, for error messages.
pub fn id_rule(max: usize) -> String {
    format!("must be 1-{max} characters of A-Z a-z 0-9 . _ -")
}

pub const MAX_AGENT_ID_LEN: usize = 64;

/// An agent id: 1–64 characters of the id alphabet, and not `.` or `..`,
/// which URL handling turns into path steps (`GET /v1/agents/..` could never
/// reach such an agent).
pub fn is_valid_agent_id(text: &str) -> bool {
    is_valid_id(text, MAX_AGENT_ID_LEN) && text != "." && text != ".."
}

/// What the agent-id rule says, for error messages.
pub const AGENT_ID_RULE: &str = "must be 1-64 characters of A-Z a-z 0-9 . _ - (and not . or ..)";
pub const MAX_KEY_ID_LEN: usize = 32;
pub const MAX_POOL_LEN: usize = 64;

pub const MAX_LABELS: usize = 32;
pub const MAX_LABEL_KEY_LEN: usize = 64;
pub const MAX_LABEL_VALUE_LEN: usize = 256;

/// A label value: at most `MAX_LABEL_VALUE_LEN` characters, none of them
/// control characters.
pub fn is_valid_label_value(value: &str) -> bool {
    value.chars().count() <= MAX_LABEL_VALUE_LEN && !value.chars().any(char::is_control)
}

/// What [`is_valid_label_value`] asks, for error messages.
pub const LABEL_VALUE_RULE: &str =
    "label values must be at most 256 characters, none of them control characters";

/// One label, key and value, by the rule a heartbeat is held to; the error
/// says what is wrong and never repeats the value (it may be long, or hold
/// what a terminal would act on).
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    if !is_valid_id(key, MAX_LABEL_KEY_LEN) {
        return Err(format!("label keys {}", id_rule(MAX_LABEL_KEY_LEN)));
    }
    if !is_valid_label_value(value) {
        return Err(LABEL_VALUE_RULE.to_owned());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_rule_for_labels() {
        assert_eq!(check_label("site", "b2"), Ok(()));
        assert_eq!(check_label("site", ""), Ok(()));
        assert!(check_label("", "b2").unwrap_err().contains("label keys"));
        assert!(check_label("si te", "b2").is_err());
        let long = "x".repeat(MAX_LABEL_VALUE_LEN + 1);
        assert_eq!(check_label("site", &long), Err(LABEL_VALUE_RULE.to_owned()));
        assert!(check_label("site", "a\u{1b}[2J").is_err());
        assert!(!check_label("site", &long).unwrap_err().contains("xxx"));
        assert!(is_valid_agent_id("gpu-01") && !is_valid_agent_id(".."));
    }
}
