#include "tests/catch.h"
#include "lib/core/json.h"
TEST_CASE("nearest key suggests a typo's intended key") { CHECK(qt::nearest_key("lerning_rate", {"learning_rate", "r"}) == "learning_rate"); }
