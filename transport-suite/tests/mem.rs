//! The in-memory transport: the checks of the suite that are not about certificates or sockets.
//! Its own unit tests (`sand_transport::mem`) check what only it has: links broken and restored
//! by hand, and a single-threaded test deciding every interleaving.

use sand_transport_suite::Mem;

sand_transport_suite::suite!(Mem;
    current: [
        messages_round_trip_in_order_per_stream,
        a_broken_connection_is_reopened_and_the_layer_above_resends,
        a_newer_connection_of_a_worker_replaces_the_older,
        large_messages_fit_and_oversize_ones_are_refused_at_send,
    ];
    multi: [no_message_of_an_old_connection_follows_the_new_ones_connected];
);
