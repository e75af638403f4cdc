#include <algorithm>
#include <cmath>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "lib/train/metrics.h"
#include "lib/train/tensorboard_events.h"
#include "tests/catch.h"
#include "tests/test_util.h"

// CRC-32C check value: RFC 3720 (iSCSI) B.4 and the CRC catalogue give 0xE3069283 for "123456789".
TEST_CASE("crc32c gives the CRC-32C check value and its TFRecord mask", "[tensorboard]") {
  const std::string check = "123456789";
  CHECK(qt::crc32c(check.data(), check.size()) == 0xE3069283u);
  const uint32_t c = 0xE3069283u;
  CHECK(qt::masked_crc32c(check.data(), check.size()) == ((c >> 15) | (c << 17)) + 0xa282ead8u);
  CHECK(qt::crc32c("", 0) == 0u);
}

// loss.html is rewritten at every logged step, between the step's sync and the next step's launches: its series keep at
// most the lowest and highest point of each pixel column (and the last), so a long run's plot costs what a short one's
// does, and a spike still shows.
TEST_CASE("the loss plot keeps two points a pixel column of a long run, its spike and its last step", "[metrics]") {
  const std::string path = qt::test::scratch_dir("loss_plot") + "/loss.html";
  // The points of the n-th polyline in the file.
  auto points = [&](size_t n) {
    std::ifstream f(path);
    const std::string html((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    size_t at = 0;
    for (size_t i = 0; i <= n; ++i) at = html.find("points='", at) + 8;
    std::vector<std::pair<double, double>> out;
    std::istringstream in(html.substr(at, html.find('\'', at) - at));
    double x, y;
    char comma;
    while (in >> x >> comma >> y) out.emplace_back(x, y);
    return out;
  };
  std::vector<std::pair<int64_t, double>> train, lr;
  for (int64_t s = 1; s <= 50000; ++s) {
    train.emplace_back(s, s == 31337 ? 9.0 : s == 40000 ? std::nan("") : 2.0 + 0.1 * std::sin(0.01 * s));
    lr.emplace_back(s, 1e-4 * (1.0 - s / 50000.0));
  }
  qt::write_loss_plot(path, train, {}, "long run", lr);
  const auto loss = points(0), rate = points(2);  // (the eval loss's, empty, between them)
  CHECK(loss.size() <= 2 * 630 + 1);  // the plot area is 630 pixels wide
  CHECK(loss.size() > 630);
  CHECK(rate.size() <= 2 * 630 + 1);
  REQUIRE(!loss.empty());
  REQUIRE(!rate.empty());
  // The spike is the highest value: the plot's top edge (y = 40); the last step at the right edge (x = 690).
  CHECK(std::any_of(loss.begin(), loss.end(), [](const auto& p) { return p.second == 40.0; }));
  CHECK(loss.back().first == 690.0);
  CHECK(rate.back().first == 690.0);
  // A short run keeps every point.
  train.resize(100);
  lr.resize(100);
  qt::write_loss_plot(path, train, {}, "short run", lr);
  CHECK(points(0).size() == 100);
  CHECK(points(2).size() == 100);
}
