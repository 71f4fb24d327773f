//! Pod builder snapshots and the reading of Pod statuses.

use super::*;
