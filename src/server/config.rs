//! [`ConfigError`]: a server layer or store refused its settings when built.

use std::fmt;

/// A setting of a server layer or store that cannot work, named when it is built (as
/// [`RetryPolicy::builder`](crate::RetryPolicy::builder) does on the client side).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    component: &'static str,
    setting: &'static str,
    problem: String,
}

impl ConfigError {
    pub(crate) fn new(component: &'static str, setting: &'static str, problem: &str) -> Self {
        ConfigError {
            component,
            setting,
            problem: problem.to_owned(),
        }
    }

    /// The setting at fault (`"lease"`, `"ttl"`, `"max_per_principal"`, ...).
    pub fn setting(&self) -> &'static str {
        self.setting
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid {} configuration: `{}` {}",
            self.component, self.setting, self.problem
        )
    }
}

impl std::error::Error for ConfigError {}
