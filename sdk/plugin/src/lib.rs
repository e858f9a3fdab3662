//! Write Quiver plugins as plain Rust.
//!
//! A plugin is one of four kinds: a [`Transform`] (input topic → output
//! topics, on the broker), a read-side [`Filter`] (inside a fetch), a
//! [`Serializer`] (validates/encodes on produce, decodes on consume) or a
//! [`Partitioner`]. Implement the kind's trait (or write a plain function) and
//! export it with the kind's macro; enable the matching cargo feature of this
//! crate. The host calls the plugin once per batch; this crate decodes the
//! batch into zero-copy [`Record`] views and encodes what you return.
//!
//! ```ignore
//! fn shout(record: &Record) -> Result<Option<Output>, Error> {
//!     Ok(Some(Output::with_value(record, record.value_str()?.to_uppercase())))
//! }
//! quiver_plugin::transform!(fn shout);
//! ```
//!
//! A transform may keep durable keyed state with [`state::get`],
//! [`state::put`] and [`state::delete`].
//!
//! The same code runs natively, so plugins are unit-tested with plain
//! `cargo test` through [`testing`].

mod output;
mod params;
mod record;
pub mod state;
pub mod testing;

#[doc(hidden)]
pub mod glue;

pub use output::Output;
pub use params::Params;
pub use record::{Headers, Record, Records, encode_record};

/// The ABI version this SDK builds plugins for (the WIT package version).
pub const ABI_VERSION: &str = "0.1.0";

/// Why a record (or a plugin's start) failed. The host shows the message with
/// the record's index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    pub fn new(message: impl Into<String>) -> Self {
        Error(message.into())
    }

    pub fn message(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Any standard error converts, so `?` works on parsing and the like.
impl<E: std::error::Error> From<E> for Error {
    fn from(e: E) -> Self {
        Error(e.to_string())
    }
}

/// Maps each input record to zero or more output records.
pub trait Transform: Sized + 'static {
    /// Called once before the first batch, with the deploy-time parameters.
    fn init(params: &Params) -> Result<Self, Error>;

    fn transform(&mut self, record: &Record<'_>) -> Result<impl IntoIterator<Item = Output>, Error>;
}

/// Keeps (`Some(Output::forward())`), drops (`None`) or rewrites a record
/// inside a fetch.
pub trait Filter: Sized + 'static {
    fn init(params: &Params) -> Result<Self, Error>;

    fn filter(&mut self, record: &Record<'_>) -> Result<Option<Output>, Error>;
}

/// Validates and encodes a record on produce; decodes it on consume. A
/// record's error rejects its whole batch.
pub trait Serializer: Sized + 'static {
    fn init(params: &Params) -> Result<Self, Error>;

    fn encode(&mut self, record: &Record<'_>) -> Result<Output, Error>;

    fn decode(&mut self, record: &Record<'_>) -> Result<Output, Error>;
}

/// Chooses each record's partition, below `partitions`.
pub trait Partitioner: Sized + 'static {
    fn init(params: &Params) -> Result<Self, Error>;

    fn partition(&mut self, record: &Record<'_>, partitions: u32) -> Result<u32, Error>;
}

/// Writes a line to the plugin's log (`quiver plugin logs NAME`). Natively it
/// goes to stderr.
pub fn log(level: Level, message: &str) {
    glue::log(level, message)
}

/// Severity of a [`log`] line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

/// Exports a transform: `transform!(fn f)` for a plain function
/// `fn(&Record) -> Result<impl IntoIterator<Item = Output>, Error>`, or
/// `transform!(T)` for a type implementing [`Transform`].
#[macro_export]
macro_rules! transform {
    (fn $f:path) => {
        #[doc(hidden)]
        pub struct __QuiverFnTransform;
        impl $crate::Transform for __QuiverFnTransform {
            fn init(_: &$crate::Params) -> Result<Self, $crate::Error> {
                Ok(__QuiverFnTransform)
            }
            fn transform(
                &mut self,
                record: &$crate::Record<'_>,
            ) -> Result<impl IntoIterator<Item = $crate::Output>, $crate::Error> {
                $f(record)
            }
        }
        $crate::transform!(__QuiverFnTransform);
    };
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __QuiverExport;
            impl $crate::__wasm::exports::quiver::plugin::transform::Guest for __QuiverExport {
                fn init(
                    params: ::std::vec::Vec<(String, String)>,
                    outputs: ::std::vec::Vec<String>,
                ) -> Result<(), String> {
                    $crate::glue::init_transform::<$t>(params, outputs)
                }
                fn transform(
                    input: $crate::__wasm::quiver::plugin::types::Batch,
                ) -> $crate::__wasm::quiver::plugin::types::BatchOutput {
                    $crate::glue::to_wit($crate::glue::call_transform::<$t>(
                        &input.records,
                        input.base_offset,
                        input.base_timestamp,
                    ))
                }
            }
    $crate::__wasm::__export_world!(__QuiverExport with_types_in $crate::__wasm);
        };
    };
}

/// Exports a read-side filter/map: `filter!(fn f)` for
/// `fn(&Record) -> Result<Option<Output>, Error>`, or `filter!(T)` for a
/// type implementing [`Filter`].
#[macro_export]
macro_rules! filter {
    (fn $f:path) => {
        #[doc(hidden)]
        pub struct __QuiverFnFilter;
        impl $crate::Filter for __QuiverFnFilter {
            fn init(_: &$crate::Params) -> Result<Self, $crate::Error> {
                Ok(__QuiverFnFilter)
            }
            fn filter(&mut self, record: &$crate::Record<'_>) -> Result<Option<$crate::Output>, $crate::Error> {
                $f(record)
            }
        }
        $crate::filter!(__QuiverFnFilter);
    };
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __QuiverExport;
            impl $crate::__wasm::exports::quiver::plugin::filter::Guest for __QuiverExport {
                fn init(params: ::std::vec::Vec<(String, String)>) -> Result<(), String> {
                    $crate::glue::init_plugin::<$t>(params, <$t as $crate::Filter>::init)
                }
                fn filter(
                    input: $crate::__wasm::quiver::plugin::types::Batch,
                ) -> $crate::__wasm::quiver::plugin::types::BatchOutput {
                    $crate::glue::to_wit($crate::glue::call_filter::<$t>(
                        &input.records,
                        input.base_offset,
                        input.base_timestamp,
                    ))
                }
            }
    $crate::__wasm::__export_world!(__QuiverExport with_types_in $crate::__wasm);
        };
    };
}

/// Exports a serializer: a type implementing [`Serializer`].
#[macro_export]
macro_rules! serializer {
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __QuiverExport;
            impl $crate::__wasm::exports::quiver::plugin::serializer::Guest for __QuiverExport {
                fn init(params: ::std::vec::Vec<(String, String)>) -> Result<(), String> {
                    $crate::glue::init_plugin::<$t>(params, <$t as $crate::Serializer>::init)
                }
                fn encode(
                    input: $crate::__wasm::quiver::plugin::types::Batch,
                ) -> $crate::__wasm::quiver::plugin::types::BatchOutput {
                    $crate::glue::to_wit($crate::glue::call_serializer::<$t>(
                        &input.records,
                        input.base_offset,
                        input.base_timestamp,
                        true,
                    ))
                }
                fn decode(
                    input: $crate::__wasm::quiver::plugin::types::Batch,
                ) -> $crate::__wasm::quiver::plugin::types::BatchOutput {
                    $crate::glue::to_wit($crate::glue::call_serializer::<$t>(
                        &input.records,
                        input.base_offset,
                        input.base_timestamp,
                        false,
                    ))
                }
            }
    $crate::__wasm::__export_world!(__QuiverExport with_types_in $crate::__wasm);
        };
    };
}

/// Exports a partitioner: `partitioner!(fn f)` for
/// `fn(&Record, u32) -> Result<u32, Error>`, or `partitioner!(T)` for a type
/// implementing [`Partitioner`].
#[macro_export]
macro_rules! partitioner {
    (fn $f:path) => {
        #[doc(hidden)]
        pub struct __QuiverFnPartitioner;
        impl $crate::Partitioner for __QuiverFnPartitioner {
            fn init(_: &$crate::Params) -> Result<Self, $crate::Error> {
                Ok(__QuiverFnPartitioner)
            }
            fn partition(&mut self, record: &$crate::Record<'_>, partitions: u32) -> Result<u32, $crate::Error> {
                $f(record, partitions)
            }
        }
        $crate::partitioner!(__QuiverFnPartitioner);
    };
    ($t:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            struct __QuiverExport;
            impl $crate::__wasm::exports::quiver::plugin::partitioner::Guest for __QuiverExport {
                fn init(params: ::std::vec::Vec<(String, String)>) -> Result<(), String> {
                    $crate::glue::init_plugin::<$t>(params, <$t as $crate::Partitioner>::init)
                }
                fn partition(
                    input: $crate::__wasm::quiver::plugin::types::Batch,
                    partitions: u32,
                ) -> Result<::std::vec::Vec<u32>, $crate::__wasm::quiver::plugin::types::RecordError> {
                    $crate::glue::call_partitioner::<$t>(
                        &input.records,
                        input.base_offset,
                        input.base_timestamp,
                        partitions,
                    )
                    .map_err(|(index, message)| $crate::__wasm::quiver::plugin::types::RecordError { index, message })
                }
            }
    $crate::__wasm::__export_world!(__QuiverExport with_types_in $crate::__wasm);
        };
    };
}

#[cfg(all(target_arch = "wasm32", feature = "transform"))]
#[doc(hidden)]
pub mod __wasm {
    wit_bindgen::generate!({
        path: "../../spec/wit",
        world: "transform-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "quiver_plugin::__wasm",
    });
}

#[cfg(all(target_arch = "wasm32", feature = "filter"))]
#[doc(hidden)]
pub mod __wasm {
    wit_bindgen::generate!({
        path: "../../spec/wit",
        world: "filter-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "quiver_plugin::__wasm",
    });
}

#[cfg(all(target_arch = "wasm32", feature = "serializer"))]
#[doc(hidden)]
pub mod __wasm {
    wit_bindgen::generate!({
        path: "../../spec/wit",
        world: "serializer-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "quiver_plugin::__wasm",
    });
}

#[cfg(all(target_arch = "wasm32", feature = "partitioner"))]
#[doc(hidden)]
pub mod __wasm {
    wit_bindgen::generate!({
        path: "../../spec/wit",
        world: "partitioner-plugin",
        pub_export_macro: true,
        export_macro_name: "__export_world",
        default_bindings_module: "quiver_plugin::__wasm",
    });
}

#[cfg(all(
    target_arch = "wasm32",
    not(any(feature = "transform", feature = "filter", feature = "serializer", feature = "partitioner"))
))]
compile_error!("enable exactly one of quiver-plugin's features: transform, filter, serializer, partitioner");
