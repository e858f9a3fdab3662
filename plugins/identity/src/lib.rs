//! Passes every record through unchanged: the baseline for measuring plugin
//! overhead, and a template for new transforms.

use quiver_plugin::{Error, Output, Record};

pub fn identity(_record: &Record<'_>) -> Result<Option<Output>, Error> {
    Ok(Some(Output::forward()))
}

quiver_plugin::transform!(fn identity);
