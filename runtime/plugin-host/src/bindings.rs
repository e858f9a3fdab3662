//! Host-side bindings generated from spec/wit, one module per plugin world.
//! The `host` and `types` interfaces are generated once and shared.

pub mod transform {
    wasmtime::component::bindgen!({
        path: "../../spec/wit",
        world: "transform-plugin",
    });
}

pub mod filter {
    wasmtime::component::bindgen!({
        path: "../../spec/wit",
        world: "filter-plugin",
        with: {
            "quiver:plugin/host": super::transform::quiver::plugin::host,
            "quiver:plugin/types": super::transform::quiver::plugin::types,
        },
    });
}

pub mod serializer {
    wasmtime::component::bindgen!({
        path: "../../spec/wit",
        world: "serializer-plugin",
        with: {
            "quiver:plugin/host": super::transform::quiver::plugin::host,
            "quiver:plugin/types": super::transform::quiver::plugin::types,
        },
    });
}

pub mod partitioner {
    wasmtime::component::bindgen!({
        path: "../../spec/wit",
        world: "partitioner-plugin",
        with: {
            "quiver:plugin/host": super::transform::quiver::plugin::host,
            "quiver:plugin/types": super::transform::quiver::plugin::types,
        },
    });
}

pub use transform::quiver::plugin::types::{Batch, BatchOutput};
pub use transform::quiver::plugin::{host, state};
