#include "lib/train/metrics.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "lib/core/error.h"
#include "lib/core/files.h"
#include "lib/core/log.h"
#include "lib/train/tensorboard_events.h"

namespace qt {

std::string format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  long s = std::lround(seconds);
  char buf[32];
  if (s >= 3600) std::snprintf(buf, sizeof buf, "%ldh%02ldm", s / 3600, (s % 3600) / 60);
  else if (s >= 60) std::snprintf(buf, sizeof buf, "%ldm%02lds", s / 60, s % 60);
  else std::snprintf(buf, sizeof buf, "%lds", s);
  return buf;
}

namespace {

// metrics.jsonl without the lines of steps after `step`, nor lines that are no JSON object with a numeric step (a
// killed run leaves one half written), a last line given its newline (written whole to a temporary file, then renamed
// over it).
void drop_lines_after(const std::string& path, int64_t step) {
  if (!files::exists(path)) return;
  const std::string all = files::read_file(path);
  std::istringstream in(all);
  std::string text, kept;
  // (A last line without its newline is rewritten with one: the resumed run's lines would run on from it.)
  bool rewrite = !all.empty() && all.back() != '\n';
  int64_t broken = 0;
  while (std::getline(in, text)) {
    const Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
    const bool blank = text.find_first_not_of(" \t\r") == std::string::npos;
    if (!j.is_object() || (j.contains("step") && !j["step"].is_number())) {
      broken += blank ? 0 : 1;
      rewrite = true;
      continue;
    }
    if (j.contains("step") && j["step"].is_number() && j["step"].get<double>() > static_cast<double>(step)) {
      rewrite = true;
      continue;
    }
    kept += text + "\n";
  }
  if (broken > 0)
    log::warn(path + ": " + std::to_string(broken) + " line(s) that are no JSON object with a numeric step dropped (a run "
              "killed while writing leaves one half written)");
  if (!rewrite) return;
  files::write_file_atomically(path, kept);
  files::sync_path(files::parent(path));
}

}  // namespace

MetricsLog::MetricsLog(const std::string& path, bool bar, bool enabled, int64_t resume_step)
    : bar_(bar), enabled_(enabled), path_(path) {
  if (!enabled_) return;
  if (resume_step > 0) drop_lines_after(path, resume_step);
  file_ = std::fopen(path.c_str(), resume_step > 0 ? "a" : "w");
  if (!file_) fail_at(ErrorKind::Io, path, std::string("cannot be opened for writing: ") + std::strerror(errno));
}

MetricsLog::~MetricsLog() {
  if (bar_open_) std::fputc('\n', stderr);
  if (file_) std::fclose(file_);
}

void MetricsLog::write(const Json& j) {
  if (!file_) return;
  std::string s = j.dump() + "\n";
  if (std::fwrite(s.data(), 1, s.size(), file_) != s.size() || std::fflush(file_) != 0)
    fail_at(ErrorKind::Io, path_, std::string("write failed: ") + std::strerror(errno));
}

void MetricsLog::line(const std::string& text) {
  if (!enabled_) return;
  if (bar_open_) {
    std::fputc('\n', stderr);
    bar_open_ = false;
  }
  std::fprintf(stderr, "%s\n", text.c_str());
}

void MetricsLog::set_plot(const std::string& path, const std::string& title) {
  plot_path_ = path;
  plot_title_ = title;
}

void MetricsLog::set_tensorboard(const std::string& dir, int64_t resume_step) {
  if (!enabled_) return;
  tensorboard_ = std::make_unique<TensorBoardWriter>(dir);
  if (resume_step > 0) tensorboard_->session_start(resume_step + 1);
}

void MetricsLog::write_plot() const {
  if (enabled_ && !plot_path_.empty()) write_loss_plot(plot_path_, train_, eval_, plot_title_, lr_);
}

void MetricsLog::step(const StepMetrics& m) {
  train_.emplace_back(m.step, m.loss);
  lr_.emplace_back(m.step, m.lr);
  if (!enabled_) return;
  Json j = {{"step", m.step}, {"loss", m.loss}, {"lr", m.lr}, {"grad_norm", m.grad_norm},
            {"tokens", m.tokens}, {"tokens_per_s", m.tokens_per_s}, {"target_tokens", m.target_tokens},
            {"target_tokens_per_s", m.target_tokens_per_s}, {"step_s", m.step_s}};
  if (m.gpu_mem_gib >= 0) j["gpu_mem_gib"] = m.gpu_mem_gib;
  if (m.gpu_reserved_gib >= 0) j["gpu_reserved_gib"] = m.gpu_reserved_gib;
  if (m.gpu_alloc_retries >= 0) j["gpu_alloc_retries"] = m.gpu_alloc_retries;
  if (m.gpu_device_allocs >= 0) j["gpu_device_allocs"] = m.gpu_device_allocs;
  if (m.gpu_device_frees >= 0) j["gpu_device_frees"] = m.gpu_device_frees;
  for (const auto& [name, value] : m.extra) j[name] = value;
  write(j);
  if (tensorboard_) {
    tensorboard_->scalar("train/loss", m.step, m.loss);
    tensorboard_->scalar("train/learning_rate", m.step, m.lr);
    tensorboard_->scalar("train/grad_norm", m.step, m.grad_norm);
    tensorboard_->scalar("train/tokens_per_s", m.step, m.tokens_per_s);
    tensorboard_->scalar("train/target_tokens_per_s", m.step, m.target_tokens_per_s);
    for (const auto& [name, value] : m.extra) tensorboard_->scalar("train/" + name, m.step, value);
  }
  char text[256];
  std::string mem = m.gpu_mem_gib >= 0 ? " | mem " + std::to_string(m.gpu_mem_gib).substr(0, 5) + " GiB" : "";
  if (bar_) {
    const int width = 24;
    int filled = m.total_steps ? static_cast<int>(width * m.step / m.total_steps) : 0;
    std::string bar = std::string(filled, '#') + std::string(width - filled, '.');
    std::snprintf(text, sizeof text, "\r[%s] %lld/%lld | loss %.4f | lr %.2e | %.0f tok/s%s | eta %s   ", bar.c_str(),
                  static_cast<long long>(m.step), static_cast<long long>(m.total_steps), m.loss, m.lr, m.tokens_per_s,
                  mem.c_str(), format_duration(m.eta_s).c_str());
    std::fputs(text, stderr);
    std::fflush(stderr);
    bar_open_ = true;
  } else {
    std::snprintf(text, sizeof text, "step %lld/%lld | loss %.4f | lr %.2e | grad norm %.3f | %.0f tok/s (%.0f target)%s | eta %s",
                  static_cast<long long>(m.step), static_cast<long long>(m.total_steps), m.loss, m.lr, m.grad_norm,
                  m.tokens_per_s, m.target_tokens_per_s, mem.c_str(), format_duration(m.eta_s).c_str());
    // DPO: how often the chosen completion's reward leads, and by how much; KTO: the margin and the KL baseline
    std::string more;
    for (const auto& [name, value] : m.extra)
      if (name == "rewards_accuracy" || name == "rewards_margin" || name == "kl") {
        char v[64];
        std::snprintf(v, sizeof v, " | %s %.3f",
                      name == "rewards_accuracy" ? "reward acc" : name == "kl" ? "kl" : "margin", value);
        more += v;
      }
    std::fprintf(stderr, "%s%s\n", text, more.c_str());
  }
  write_plot();
}

void MetricsLog::exact_match(int64_t step, int64_t correct, int64_t total) {
  if (!enabled_) return;
  if (tensorboard_) tensorboard_->scalar("eval/exact_match", step, total ? static_cast<double>(correct) / total : 0.0);
  write({{"step", step},
         {"exact_match", total ? static_cast<double>(correct) / static_cast<double>(total) : 0.0},
         {"exact_match_correct", correct},
         {"exact_match_total", total}});
}

void MetricsLog::eval(int64_t step, double loss, int64_t count, const char* preference) {
  const bool pairs = preference != nullptr;
  eval_.emplace_back(step, loss);
  if (!enabled_) return;
  if (pairs) {
    write({{"step", step}, {"eval_loss", loss}, {"eval_pairs", count}});
  } else {
    write({{"step", step}, {"eval_loss", loss}, {"eval_perplexity", std::exp(loss)}, {"eval_tokens", count}});
  }
  if (tensorboard_) tensorboard_->scalar("eval/loss", step, loss);
  char text[160];
  if (pairs)
    std::snprintf(text, sizeof text, "eval at step %lld: %s loss %.4f (%lld pairs)", static_cast<long long>(step),
                  preference, loss, static_cast<long long>(count));
  else
    std::snprintf(text, sizeof text, "eval at step %lld: loss %.4f, perplexity %.3f (%lld tokens)",
                  static_cast<long long>(step), loss, std::exp(loss), static_cast<long long>(count));
  line(text);
  write_plot();
}

void MetricsLog::load_history(const std::string& path, int64_t up_to_step) {
  std::ifstream in(path);
  std::string text;
  while (std::getline(in, text)) {
    Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
    if (!j.is_object() || !j.contains("step") || !j["step"].is_number()) continue;
    const double step = j["step"].get<double>();
    if (step > static_cast<double>(up_to_step)) continue;
    const auto s = static_cast<int64_t>(step);
    // (A value written as null, a non-finite one, is no point of the plot.)
    auto number = [&](const char* key, std::vector<std::pair<int64_t, double>>& series) {
      if (j.contains(key) && j[key].is_number()) series.emplace_back(s, j[key].get<double>());
    };
    number("loss", train_);
    number("eval_loss", eval_);
    // A non-finite held-out loss is an evaluation all the same (early stopping counts it): NaN.
    if (j.contains("eval_loss") && j["eval_loss"].is_null()) eval_.emplace_back(s, std::nan(""));
    number("lr", lr_);
  }
}

namespace {

using Series = std::vector<std::pair<int64_t, double>>;

// The points a plot `columns` pixels wide shows of a series: at most the lowest and the highest finite value of each
// pixel column, in step order, and the last point. The plot is rewritten at every logged step, between the step's
// one sync and the next step's launches, so its cost is the GPU's idle time: with every point it grew with the run
// (13.6 ms a step at 10,000 logged steps, 70 ms at 50,000); now it stops growing at 2 points a column.
Series per_column(const Series& pts, double x_max, int64_t columns) {
  if (static_cast<int64_t>(pts.size()) <= 2 * columns) return pts;
  Series out;
  out.reserve(static_cast<size_t>(2 * columns + 1));
  const auto column = [&](size_t i) { return static_cast<int64_t>(static_cast<double>(pts[i].first) / x_max * columns); };
  for (size_t i = 0; i < pts.size();) {
    const int64_t c = column(i);
    size_t lo = pts.size(), hi = pts.size(), j = i;
    for (; j < pts.size() && column(j) == c; ++j) {
      if (!std::isfinite(pts[j].second)) continue;
      if (lo == pts.size() || pts[j].second < pts[lo].second) lo = j;
      if (hi == pts.size() || pts[j].second > pts[hi].second) hi = j;
    }
    if (lo != pts.size()) {
      out.push_back(pts[std::min(lo, hi)]);
      if (lo != hi) out.push_back(pts[std::max(lo, hi)]);
    }
    i = j;
  }
  if (out.empty() || out.back().first != pts.back().first) out.push_back(pts.back());
  return out;
}

// "x,y " at a tenth of a pixel (snprintf: an ostream's double formatting was most of the plot's time).
void append_point(std::string& s, double x, double y) {
  char buf[48];
  const int n = std::snprintf(buf, sizeof buf, "%.1f,%.1f ", x, y);
  if (n > 0) s.append(buf, static_cast<size_t>(std::min<int>(n, sizeof buf - 1)));
}

}  // namespace

void write_loss_plot(const std::string& path, const std::vector<std::pair<int64_t, double>>& train,
                     const std::vector<std::pair<int64_t, double>>& eval, const std::string& title,
                     const std::vector<std::pair<int64_t, double>>& lr) {
  const double W = 760, H = 420, L = 60, R = 70, T = 40, B = 50;
  double x_max = 1, y_min = INFINITY, y_max = -INFINITY;
  for (const auto* series : {&train, &eval})
    for (const auto& [s, v] : *series) {
      if (!std::isfinite(v)) continue;
      x_max = std::max(x_max, static_cast<double>(s));
      y_min = std::min(y_min, v);
      y_max = std::max(y_max, v);
    }
  if (!std::isfinite(y_min)) y_min = 0, y_max = 1;
  if (y_max - y_min < 1e-9) y_max = y_min + 1;
  auto X = [&](double s) { return L + (W - L - R) * s / x_max; };
  auto Y = [&](double v) { return T + (H - T - B) * (1 - (v - y_min) / (y_max - y_min)); };
  const int64_t columns = static_cast<int64_t>(W - L - R);
  auto polyline = [&](const std::vector<std::pair<int64_t, double>>& pts, const char* color) {
    std::string o = std::string("<polyline fill='none' stroke='") + color + "' stroke-width='2' points='";
    for (const auto& [s, v] : per_column(pts, x_max, columns))
      if (std::isfinite(v)) append_point(o, X(static_cast<double>(s)), Y(v));
    return o + "'/>";
  };
  std::ostringstream h;
  h << "<!doctype html><html><head><meta charset='utf-8'><title>" << title << "</title></head><body style='font-family:sans-serif'>"
    << "<h3>" << title << "</h3><svg width='" << W << "' height='" << H << "' style='background:#fff;border:1px solid #ccc'>";
  for (int i = 0; i <= 4; ++i) {
    double v = y_min + (y_max - y_min) * i / 4;
    h << "<line x1='" << L << "' x2='" << W - R << "' y1='" << Y(v) << "' y2='" << Y(v) << "' stroke='#eee'/>"
      << "<text x='5' y='" << Y(v) + 4 << "' font-size='11'>" << std::to_string(v).substr(0, 6) << "</text>";
  }
  // Step ticks: 5 intervals of a whole number of steps.
  const int64_t x_step = std::max<int64_t>(1, static_cast<int64_t>(std::ceil(x_max / 5)));
  for (int64_t s = 0; s <= static_cast<int64_t>(x_max); s += x_step) {
    const double x = X(static_cast<double>(s));
    h << "<line x1='" << x << "' x2='" << x << "' y1='" << T << "' y2='" << H - B << "' stroke='#eee'/>"
      << "<text x='" << x - 8 << "' y='" << H - B + 15 << "' font-size='11'>" << s << "</text>";
  }
  h << "<text x='" << W / 2 - 10 << "' y='" << H - 12 << "' font-size='12'>step</text>";
  h << polyline(train, "#1f77b4") << polyline(eval, "#d62728");
  // The learning rate on its own scale, [0, its maximum], labelled on the right.
  double lr_max = 0;
  for (const auto& p : lr) lr_max = std::max(lr_max, p.second);
  if (lr_max > 0) {
    std::string o = "<polyline fill='none' stroke='#2ca02c' stroke-width='1.5' stroke-dasharray='5,3' points='";
    for (const auto& [s, v] : per_column(lr, x_max, columns))
      append_point(o, X(static_cast<double>(s)), T + (H - T - B) * (1 - v / lr_max));
    h << o << "'/>";
    for (int i = 0; i <= 4; ++i) {
      char label[32];
      std::snprintf(label, sizeof label, "%.2e", lr_max * i / 4);
      h << "<text x='" << W - R + 4 << "' y='" << T + (H - T - B) * (1 - i / 4.0) + 4 << "' font-size='11' fill='#2ca02c'>"
        << label << "</text>";
    }
    h << "<text x='" << W - 300 << "' y='25' fill='#2ca02c' font-size='12'>learning rate</text>";
  }
  h << "<text x='" << W - 200 << "' y='25' fill='#1f77b4' font-size='12'>train loss</text>";
  if (!eval.empty()) h << "<text x='" << W - 110 << "' y='25' fill='#d62728' font-size='12'>eval loss</text>";
  h << "</svg></body></html>\n";
  // A browser that reloads the page mid-run never reads a half-written file. Not fsync'ed: it is rewritten at every
  // logged step, between the step's one host-device sync and the next step's launches, where an fsync (milliseconds
  // on a journaled file system) would leave the GPU idle; metrics.jsonl holds the same figures.
  files::write_file_atomically(path, h.str(), /*sync=*/false);
}

}  // namespace qt
