//! The series every component exports besides its own: `meridian_build_info`
//! and the standard `process_*` metrics (CPU, resident memory, open and
//! maximum descriptors, start time).

use prometheus::{IntGaugeVec, Opts, Registry};

/// Registers `meridian_build_info{component, version}` (always 1) and the
/// process collector on `registry`.
pub fn register_common(registry: &Registry, component: &str) {
    let info = IntGaugeVec::new(
        Opts::new(
            "meridian_build_info",
            "Always 1; the labels say which component and version run",
        ),
        &["component", "version"],
    )
    .expect("metric");
    info.with_label_values(&[component, env!("CARGO_PKG_VERSION")])
        .set(1);
    registry.register(Box::new(info)).expect("register");
    registry
        .register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))
        .expect("register");
}
