#include <string>

#include "lib/train/tensorboard_events.h"
#include "tests/catch.h"

// CRC-32C check value: RFC 3720 (iSCSI) B.4 and the CRC catalogue give 0xE3069283 for "123456789".
TEST_CASE("crc32c gives the CRC-32C check value and its TFRecord mask", "[tensorboard]") {
  const std::string check = "123456789";
  CHECK(qt::crc32c(check.data(), check.size()) == 0xE3069283u);
  const uint32_t c = 0xE3069283u;
  CHECK(qt::masked_crc32c(check.data(), check.size()) == ((c >> 15) | (c << 17)) + 0xa282ead8u);
  CHECK(qt::crc32c("", 0) == 0u);
}
