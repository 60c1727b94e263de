//! A damaged store file stops the process with a clear word, not a panic.
//!
//! redb answers most damage with an error, but a page whose bytes are
//! garbage (a failing disk, a file scribbled on) can make it panic deep in
//! a read (`unreachable`). Both binaries install [`exit_on_store_damage`]:
//! a panic raised inside redb prints what is wrong and what to do, and
//! exits with [`EXIT_STORE_DAMAGED`], which the systemd units do not restart
//! on (`RestartPreventExitStatus=`), so a damaged store is a stopped unit
//! with a reason in its journal rather than a crash loop.

/// The exit status for a damaged store (EX_DATAERR).
pub const EXIT_STORE_DAMAGED: i32 = 65;

/// Installs the panic hook; other panics keep the default report.
/// `advice` says what to do about it (named files, commands).
pub fn exit_on_store_damage(program: &'static str, advice: &'static str) {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let location = info.location();
        if location.is_some_and(|l| l.file().contains("redb")) {
            let what = info
                .payload()
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| info.payload().downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "an unreadable page".to_owned());
            eprintln!(
                "{program}: the store file is damaged: the database engine found a page it cannot read ({what}). Nothing more is read or written. {advice}"
            );
            std::process::exit(EXIT_STORE_DAMAGED);
        }
        default(info);
    }));
}
