//! Backend choice: forced backends, `Auto`, and the `REACTOR_BACKEND` override.
//!
//! This file holds a single test because it changes the process environment, which must not
//! race with other tests reading it.

use std::io::ErrorKind;

use reactor::{BACKEND_ENV, Backend, Builder};

fn with_env(value: Option<&str>, f: impl FnOnce()) {
    // SAFETY: this binary runs one test, so no other thread reads the environment meanwhile.
    unsafe {
        match value {
            Some(v) => std::env::set_var(BACKEND_ENV, v),
            None => std::env::remove_var(BACKEND_ENV),
        }
    }
    f();
    // SAFETY: as above.
    unsafe { std::env::remove_var(BACKEND_ENV) };
}

#[test]
fn backend_choice_and_env_override() {
    with_env(None, || {
        #[cfg(feature = "uring")]
        assert_eq!(
            Builder::new().build().unwrap().backend(),
            Backend::Uring,
            "Auto prefers io_uring"
        );
        #[cfg(all(feature = "epoll", not(feature = "uring")))]
        assert_eq!(Builder::new().build().unwrap().backend(), Backend::Epoll);
        for b in [Backend::Uring, Backend::Epoll] {
            let built = cfg!(feature = "uring") && b == Backend::Uring
                || cfg!(feature = "epoll") && b == Backend::Epoll;
            match Builder::new().backend(b).build() {
                Ok(r) => {
                    assert!(built);
                    assert_eq!(r.backend(), b);
                }
                Err(e) => {
                    assert!(!built, "{b}: {e}");
                    assert_eq!(e.kind(), ErrorKind::Unsupported);
                    assert!(e.to_string().contains("feature"), "{e}");
                }
            }
        }
    });
    #[cfg(feature = "epoll")]
    with_env(Some("epoll"), || {
        assert_eq!(
            Builder::new().build().unwrap().backend(),
            Backend::Epoll,
            "env overrides Auto"
        );
        #[cfg(feature = "uring")]
        assert_eq!(
            Builder::new()
                .backend(Backend::Uring)
                .build()
                .unwrap()
                .backend(),
            Backend::Uring,
            "env does not override a forced backend"
        );
    });
    #[cfg(feature = "uring")]
    with_env(Some("uring"), || {
        assert_eq!(Builder::new().build().unwrap().backend(), Backend::Uring);
    });
    with_env(Some("kqueue"), || {
        let e = Builder::new().build().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidInput);
        assert!(e.to_string().contains(BACKEND_ENV), "{e}");
    });
    assert_eq!("io_uring".parse::<Backend>().unwrap(), Backend::Uring);
    assert_eq!("EPOLL".parse::<Backend>().unwrap(), Backend::Epoll);
    assert_eq!(Backend::Uring.to_string(), "uring");
}
