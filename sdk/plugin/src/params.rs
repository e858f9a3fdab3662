//! Parameters given at deploy time (`--param k=v`), read once at start.

use crate::Error;

/// The plugin's parameters, in the order given (and, for a transform, its
/// output topics).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Params {
    pairs: Vec<(String, String)>,
    outputs: Vec<String>,
}

impl Params {
    pub fn new(pairs: Vec<(String, String)>) -> Self {
        Params { pairs, outputs: Vec::new() }
    }

    /// These parameters for a transform deployed with `outputs`.
    pub fn with_outputs(mut self, outputs: Vec<String>) -> Self {
        self.outputs = outputs;
        self
    }

    /// A transform's output topics, in deploy order (empty for other kinds).
    pub fn outputs(&self) -> &[String] {
        &self.outputs
    }

    /// The last value given for `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.pairs.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// The value of a parameter the plugin cannot run without.
    pub fn require(&self, name: &str) -> Result<&str, Error> {
        self.get(name).ok_or_else(|| Error::new(format!("missing parameter '{name}'")))
    }

    /// A parameter parsed as `T`, or `default` when it is not given.
    pub fn parse_or<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, Error>
    where
        T::Err: std::fmt::Display,
    {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|e| Error::new(format!("parameter '{name}' = '{v}': {e}"))),
        }
    }

    /// A comma-separated list parameter (empty when not given).
    pub fn list(&self, name: &str) -> Vec<&str> {
        self.get(name).map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect()).unwrap_or_default()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }
}
