//! SQL for the entity tables, one module per table; each returns rows and
//! renders them as the typed views of `views.rs`.

pub mod approvals;
pub mod bookings;
pub mod payments;
pub mod settlements;
pub mod users;
