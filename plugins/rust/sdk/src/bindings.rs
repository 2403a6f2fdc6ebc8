//! wit-bindgen output. The host imports come from a world of imports only;
//! each plugin world's export glue sits behind its cargo feature, because
//! every world whose bindings are linked into a component is merged into that
//! component's type: a filter carrying the merge world's bindings would
//! import the merge world's types too and no longer target `filter` exactly.

pub mod host {
    wit_bindgen::generate!({
        inline: "
            package ferry:sdk;
            world imports {
                import ferry:plugin/types@0.1.0;
                import ferry:plugin/log@0.1.0;
                import ferry:plugin/config@0.1.0;
            }
        ",
        path: "../../../wit",
        world: "ferry:sdk/imports",
        generate_all,
        // Plugins compare and copy events and verdicts, in tests above all.
        additional_derives: [PartialEq, Eq, Clone],
    });
}

#[cfg(feature = "filter")]
pub mod filter {
    wit_bindgen::generate!({
        world: "ferry:plugin/filter",
        path: "../../../wit",
        pub_export_macro: true,
        default_bindings_module: "ferry_plugin_sdk::__private::filter",
        with: {
            "ferry:plugin/types@0.1.0": crate::bindings::host::ferry::plugin::types,
            "ferry:plugin/log@0.1.0": crate::bindings::host::ferry::plugin::log,
            "ferry:plugin/config@0.1.0": crate::bindings::host::ferry::plugin::config,
        },
    });
}

#[cfg(feature = "merge")]
pub mod merge {
    wit_bindgen::generate!({
        world: "ferry:plugin/merge",
        path: "../../../wit",
        pub_export_macro: true,
        default_bindings_module: "ferry_plugin_sdk::__private::merge",
        with: {
            "ferry:plugin/types@0.1.0": crate::bindings::host::ferry::plugin::types,
            "ferry:plugin/log@0.1.0": crate::bindings::host::ferry::plugin::log,
            "ferry:plugin/config@0.1.0": crate::bindings::host::ferry::plugin::config,
        },
    });
}
