//! The export glue behind `export_filter!` and `export_merge!`. The macros expand only on `wasm32`;
//! everything else in the SDK also builds for the host so plugins test natively.

/// Builds a plugin instance from the host's config table. A bad config traps
/// the instance after logging why: the world's functions have no way to
/// report it per call, and the host's error policy covers traps.
#[cfg(target_arch = "wasm32")]
pub fn instance<T>(new: fn(&crate::Config) -> Result<T, crate::ConfigError>) -> T {
    match new(&crate::Config::from_host()) {
        Ok(plugin) => plugin,
        Err(e) => {
            let message = e.to_string();
            crate::log::error("invalid plugin config", &[("error", &message)]);
            panic!("invalid plugin config: {message}");
        }
    }
}

/// Exports a [`Filter`](crate::Filter) implementation as the component's
/// `filter` world. Use once per crate, at the crate root; the crate must be a
/// `cdylib` built for `wasm32-wasip2`. Expands to nothing on other targets.
#[cfg(feature = "filter")]
#[macro_export]
macro_rules! export_filter {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static PLUGIN: ::std::cell::RefCell<::std::option::Option<$plugin>> =
                    const { ::std::cell::RefCell::new(::std::option::Option::None) };
            }

            struct Export;

            impl $crate::__private::filter::Guest for Export {
                fn filter(batch: $crate::__private::BatchRef<'_>) -> ::std::vec::Vec<$crate::Verdict> {
                    PLUGIN.with_borrow_mut(|slot| {
                        let plugin =
                            slot.get_or_insert_with(|| $crate::__private::instance(<$plugin as $crate::Filter>::new));
                        <$plugin as $crate::Filter>::filter(plugin, &$crate::Events::from_host(batch))
                    })
                }
            }

            use $crate::__private::filter as bindings;
            bindings::export! { Export with_types_in bindings }
        };
    };
}

/// Exports a [`Merge`](crate::Merge) implementation as the component's
/// `merge` world. Use once per crate, at the crate root; the crate must be a
/// `cdylib` built for `wasm32-wasip2`. Expands to nothing on other targets.
#[cfg(feature = "merge")]
#[macro_export]
macro_rules! export_merge {
    ($plugin:ty) => {
        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static PLUGIN: ::std::cell::OnceCell<$plugin> = const { ::std::cell::OnceCell::new() };
            }

            struct Export;

            impl $crate::__private::merge::Guest for Export {
                fn merge(
                    key: ::std::string::String,
                    current: ::std::option::Option<$crate::Versioned>,
                    incoming: $crate::Versioned,
                ) -> ::std::result::Result<::std::vec::Vec<u8>, ::std::string::String> {
                    PLUGIN.with(|cell| {
                        let plugin = cell.get_or_init(|| $crate::__private::instance(<$plugin as $crate::Merge>::new));
                        <$plugin as $crate::Merge>::merge(plugin, &key, current, incoming)
                    })
                }
            }

            use $crate::__private::merge as bindings;
            bindings::export! { Export with_types_in bindings }
        };
    };
}
