//! `--check`: validate a component's configuration the way its start does,
//! without starting it, and say what it would run with.

use anyhow::Context;
use std::path::Path;

/// The origin: its settings, its key file (mode, owner, format) and its
/// content directory.
pub(crate) fn origin(cfg: &meridian_origin::OriginConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    let key = meridian_origin::service::load_key(&cfg.key_file)?;
    anyhow::ensure!(
        cfg.content.is_dir(),
        "content directory {} does not exist or is not a directory; create it or fix `content`",
        cfg.content.display()
    );
    println!("origin configuration OK");
    println!("  content   {}", cfg.content.display());
    println!("  state     {}", cfg.state.display());
    println!(
        "  key       {} (public {})",
        cfg.key_file.display(),
        key.public()
    );
    println!("  listen    http://{}", cfg.listen);
    if let Some(a) = cfg.listener.listen_tls {
        println!("  listen    https://{a}");
    }
    println!(
        "  expiry    {} (re-signed {} before)",
        humantime::format_duration(cfg.expiry),
        humantime::format_duration(cfg.resign_before)
    );
    Ok(())
}

/// A mirror: its settings.
pub(crate) fn mirror(cfg: &meridian_mirror::MirrorConfig) -> anyhow::Result<()> {
    cfg.validate()?;
    println!("mirror configuration OK");
    println!("  id        {} (region {:?})", cfg.id, cfg.region);
    for u in &cfg.upstreams {
        println!("  upstream  {u}");
    }
    for k in &cfg.trust {
        println!("  trust     {k}");
    }
    println!("  state     {}", cfg.state.display());
    println!("  listen    http://{}", cfg.listen);
    if let Some(a) = cfg.listener.listen_tls {
        println!("  listen    https://{a}");
    }
    println!(
        "  admin API {}",
        if cfg.admin_token.is_some() {
            "on"
        } else {
            "off"
        }
    );
    Ok(())
}

/// GeoDNS: the file, and every GeoIP database it names.
pub(crate) fn geodns(path: &Path) -> anyhow::Result<()> {
    let cfg = meridian_geodns::config::GeoDnsConfig::load(path)?;
    for db in [&cfg.geoip, &cfg.geoip_v6].into_iter().flatten() {
        let g = meridian_geodns::geoip::GeoDb::open(db)
            .with_context(|| format!("GeoIP database named in {}", path.display()))?;
        println!("  geoip     {} ({})", db.display(), g.database_type);
    }
    println!("geodns configuration {} OK", path.display());
    for l in &cfg.listen {
        println!("  listen    {l} (udp+tcp)");
    }
    println!(
        "  zones     {}",
        cfg.zones
            .iter()
            .map(|z| z.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  mirrors   {}",
        cfg.mirrors
            .iter()
            .map(|m| m.id.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
