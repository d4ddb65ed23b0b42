// dynamicid world: a procedural face world, drawn deterministically in C++.
//
// Every identity is a number. identity(id) draws its traits (face shape, skin,
// hair, eyes, nose, brows, mouth, beard, freckles, clothes) from a 64-bit
// integer stream; a `face_spec` adds motion (expression, yaw, pitch) and
// context (accessories, position, scale); a `scene` holds one or two faces and
// a background. render() draws the scene into RGB8 and returns the ground
// truth of every face: box, 5 keypoints, 106 landmarks, angles and labels,
// computed from the same geometry the pixels come from.
//
//     using namespace dynamicid::world;
//     scene s = sample_scene(/*id=*/42, /*sample=*/0, /*seed=*/1);      // a random single-person picture
//     s.faces[0].motion = {expression::happy, -35.0, 0.0};                  // happy, turned to the viewer's left
//     rendering r = render(s, 128, 128);                                    // r.rgb: 128*128*3 bytes
//     std::string text = scene_caption(s);  // "a person with a happy expression in side view, ... on the beach"
//
// Geometry. A face is a surface z(x, y) in head units (1 = half the width of
// an average face) rotated by yaw about the vertical axis, then by pitch about
// the horizontal one, and projected orthographically. Every feature (jaw
// contour, eyes, brows, nose, mouth, glasses, hairline) is a list of surface
// points pushed through that projection, so turning the head slides features
// along the face, narrows the far side (the far eye gets smaller) and moves
// the protruding nose further than the cheeks.
//
// Conventions. x grows to the right, y downwards, in pixels of the output.
// yaw < 0 turns the face to the viewer's left (the nose moves left): label
// `left` for yaw <= -10 degrees, `right` for yaw >= 10, otherwise `front`.
// pitch > 0 raises the face: label `up` for pitch > 10, `down` for pitch < -10
// (the thresholds of face_prompt.hpp's pose_from_angles). "Left" and "right"
// of eyes, brows and mouth corners are always the viewer's.
//
// The 106 landmarks follow insightface's 2d106det layout as far as it is
// publicly documented (its mark-up numbers points by name, so index order is
// not spatial order):
//
//   0-32   jaw contour. In spatial order from the viewer-left temple, round
//          the chin (index 0) to the viewer-right temple:
//          1, 9..16, 2..8, 0, 24..18, 32..25, 17
//   33-42  viewer-left eye: 35 left corner, 41 / 40 / 42 upper lid (left,
//          middle, right), 39 right corner, 37 / 33 / 36 lower lid (right,
//          middle, left), 38 pupil centre, 34 top of the visible iris
//   43-51  viewer-left brow: upper edge left to right 43, 48, 49, 51, 50;
//          lower edge left to right 44, 45, 46, 47
//   52-71  mouth: outer lip 52 left corner, 64, 63, 71 (top middle), 67, 68,
//          61 right corner, 58, 59, 53 (bottom middle), 56, 55; inner lip 65
//          left corner, 66, 62, 70 upper (left to right), 69 right corner,
//          57, 60, 54 lower (right to left)
//   72-86  nose: bridge 72 (top), 73, 74, tip 86; left side 75, 76, 77 (top
//          down); right side 81, 82, 83; base left to right 78, 79, 80
//          (under the tip), 85, 84
//   87-96  viewer-right eye, laid out like the left one plus 54: 89 left
//          corner, 95 / 94 / 96 upper, 93 right corner, 91 / 87 / 90 lower,
//          92 pupil centre, 88 top of the visible iris
//   97-105 viewer-right brow: upper edge left to right 102, 103, 104, 105,
//          101; lower edge left to right 97, 98, 99, 100
//
// The contour, brow, nose and outer-mouth indices agree with the public
// 106-to-68 correspondence; the ordering inside each eye (beyond the corners
// and the four lid points of the 68 layout) is this library's choice.
//
// Determinism. Traits and scene choices come from std::mt19937_64 (fully
// specified by the standard) mapped to [0, 1) by this file, never from
// std::uniform_*_distribution; geometry uses IEEE-754 double +, -, *, / and
// sqrt plus this file's own sine, so the pixels of a given (id, seed) are the
// same in every run and on every platform with IEEE-754 arithmetic, as long as
// the compiler does not fuse multiply-adds (-ffp-contract=off where it would).
//
// Held-out identities are simply another id range: the shipped model trains
// on ids [0, N) and is evaluated on ids from 1'000'000 up (`held_out_first_id`).
#pragma once

#include <dynamicid/core/error.hpp>
#include <dynamicid/modules/clip/image_processor.hpp>
#include <dynamicid/modules/dynamicid/face_prompt.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace dynamicid::world {

inline constexpr std::string_view world_component = "world";

/// The first identity of the documented held-out range.
inline constexpr std::uint64_t held_out_first_id = 1'000'000;

/// Largest accepted image side.
inline constexpr int max_image_side = 2048;
/// Smallest accepted image side.
inline constexpr int min_image_side = 16;

enum class expression : std::uint8_t { neutral, happy, sad, surprised, angry };
enum class yaw_label : std::uint8_t { left, front, right };
enum class pitch_label : std::uint8_t { up, front, down };
enum class background_kind : std::uint8_t { plain, beach, forest, city, room, mountains };
enum class accessories : std::uint8_t { none, hat, glasses, both };
enum class hair_style : std::uint8_t { bald, short_cut, fringe, long_hair, curly, bob, bun };
enum class beard_style : std::uint8_t { none, stubble, full, moustache, goatee };

/// An 8-bit colour.
struct rgb8 {
    std::uint8_t r = 0, g = 0, b = 0;
    friend bool operator==(const rgb8&, const rgb8&) = default;
};

namespace detail {

inline constexpr double pi = 3.14159265358979323846;

/// sin from +, -, *, / only (Taylor series after reduction to [-pi/2, pi/2]),
/// so results do not depend on the platform's libm.
inline double sine(double x) {
    const double turns = std::floor(x / (2.0 * pi) + 0.5);
    x -= turns * (2.0 * pi);
    if (x > pi / 2) x = pi - x;
    else if (x < -pi / 2) x = -pi - x;
    const double x2 = x * x;
    double term = x, sum = x;
    for (int n = 1; n <= 9; ++n) {
        term *= -x2 / static_cast<double>((2 * n) * (2 * n + 1));
        sum += term;
    }
    return sum;
}
inline double cosine(double x) { return sine(x + pi / 2); }
inline double radians(double degrees) { return degrees * (pi / 180.0); }
inline double lerp(double a, double b, double t) { return a + (b - a) * t; }
inline double clamp01(double x) { return x < 0.0 ? 0.0 : (x > 1.0 ? 1.0 : x); }

inline std::uint64_t splitmix(std::uint64_t x) {
    x += 0x9e3779b97f4a7c15ull;
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

/// mt19937_64 with this file's own mapping to doubles and integers.
class random_stream {
public:
    explicit random_stream(std::uint64_t seed) : engine_(seed) {}
    double uniform() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }
    double range(double lo, double hi) { return lo + (hi - lo) * uniform(); }
    int below(int n) { return static_cast<int>(engine_() % static_cast<std::uint64_t>(n)); }
    bool chance(double p) { return uniform() < p; }

private:
    std::mt19937_64 engine_;
};

struct color {
    double r = 0, g = 0, b = 0;
};
inline color to_color(rgb8 c) { return {double(c.r), double(c.g), double(c.b)}; }
inline rgb8 to_rgb8(color c) {
    const auto q = [](double v) { return static_cast<std::uint8_t>(v <= 0.0 ? 0.0 : (v >= 255.0 ? 255.0 : std::floor(v + 0.5))); };
    return {q(c.r), q(c.g), q(c.b)};
}
inline color mix(color a, color b, double t) { return {lerp(a.r, b.r, t), lerp(a.g, b.g, t), lerp(a.b, b.b, t)}; }
inline color scale(color a, double k) { return {a.r * k, a.g * k, a.b * k}; }

struct point {
    double x = 0, y = 0;
};

}  // namespace detail

/// Everything that makes a person recognisable; fixed for an identity.
///
///     identity_traits t = identity(7);   // the same traits on every run
struct identity_traits {
    std::uint64_t id = 0;
    double face_width = 1.0;      ///< half-width of the face, head units (0.86..1.08)
    double face_height = 1.25;    ///< chin distance below the eye line, head units (1.1..1.4)
    double jaw_roundness = 0.5;   ///< 0 square jaw, 1 round
    double chin_pointiness = 0.3; ///< 0 broad chin, 1 narrow
    rgb8 skin{};
    double skin_tone = 0.5;       ///< 0 lightest .. 1 darkest
    rgb8 hair_color{};
    hair_style hair = hair_style::short_cut;
    double hair_volume = 0.1;
    double hairline = 0.0;        ///< -1 low .. 1 receding
    double hair_part = 0.0;       ///< -1 .. 1 side parting
    rgb8 eyes{};
    double eye_size = 1.0;        ///< relative (0.8..1.25)
    double eye_spacing = 0.38;    ///< half-distance between eye centres, head units
    double eye_height = -0.1;     ///< eye line, head units (negative: up)
    double nose_length = 1.0;     ///< relative (0.75..1.3)
    double nose_width = 1.0;      ///< relative (0.75..1.35)
    double brow_thickness = 1.0;  ///< relative (0.6..1.7)
    double brow_angle = 0.0;      ///< -1 outer ends down .. 1 outer ends up
    double mouth_width = 0.32;    ///< half-width, head units
    double lip_fullness = 1.0;    ///< relative (0.6..1.5)
    rgb8 lips{};
    beard_style beard = beard_style::none;
    bool freckles = false;
    bool blush = false;
    double ear_size = 1.0;
    rgb8 shirt{};
    int neckline = 0;             ///< 0 round, 1 v-neck, 2 collar
};

/// Expression and head pose; the labels are derived from the angles.
struct face_motion {
    world::expression expression = expression::neutral;
    double yaw_degrees = 0.0;    ///< < 0: facing the viewer's left
    double pitch_degrees = 0.0;  ///< > 0: facing up
};

/// One person in a scene.
struct face_spec {
    identity_traits traits;
    face_motion motion;
    world::accessories accessories = accessories::none;
    rgb8 hat{};
    int hat_style = 0;           ///< 0 brimmed, 1 beanie
    rgb8 glasses{};
    double center_x = 0.5;       ///< face centre, fraction of the width
    double center_y = 0.45;      ///< eye-line height, fraction of the height
    double scale = 0.42;         ///< face box height / image height
};

/// A picture: one face (training) or two side by side (evaluation).
struct scene {
    background_kind background = background_kind::plain;
    std::uint64_t background_seed = 0;  ///< layout and colours of the background
    std::vector<face_spec> faces;
};

/// Ground truth of one drawn face, in output pixels.
struct face_truth {
    std::array<double, 4> box{};                          ///< x0, y0, x1, y1 (forehead top to chin, cheek to cheek)
    std::array<std::array<double, 2>, 5> kps5{};          ///< left eye, right eye, nose tip, left and right mouth corner
    std::array<std::array<double, 2>, 106> landmarks{};   ///< 2d106det layout (see the file comment)
    double yaw_degrees = 0, pitch_degrees = 0;
};

/// Pixels (height x width x 3, row-major) plus one truth per face, in scene order.
struct rendering {
    int width = 0, height = 0;
    std::vector<std::uint8_t> rgb;
    std::vector<face_truth> faces;
};

// ---------------------------------------------------------------------------
// Names and labels

inline std::string_view name(expression e) {
    constexpr std::array<std::string_view, 5> n{"neutral", "happy", "sad", "surprised", "angry"};
    return n[static_cast<std::size_t>(e)];
}
inline std::string_view name(yaw_label l) {
    constexpr std::array<std::string_view, 3> n{"left", "front", "right"};
    return n[static_cast<std::size_t>(l)];
}
inline std::string_view name(pitch_label l) {
    constexpr std::array<std::string_view, 3> n{"up", "front", "down"};
    return n[static_cast<std::size_t>(l)];
}
inline std::string_view name(background_kind b) {
    constexpr std::array<std::string_view, 6> n{"plain", "beach", "forest", "city", "room", "mountains"};
    return n[static_cast<std::size_t>(b)];
}
inline std::string_view name(accessories a) {
    constexpr std::array<std::string_view, 4> n{"none", "hat", "glasses", "both"};
    return n[static_cast<std::size_t>(a)];
}
inline std::string_view name(hair_style h) {
    constexpr std::array<std::string_view, 7> n{"bald", "short", "fringe", "long", "curly", "bob", "bun"};
    return n[static_cast<std::size_t>(h)];
}
inline std::string_view name(beard_style b) {
    constexpr std::array<std::string_view, 5> n{"none", "stubble", "full", "moustache", "goatee"};
    return n[static_cast<std::size_t>(b)];
}

namespace detail {
template <class E, std::size_t N>
E parse_label(std::string_view word, std::string_view what) {
    std::string known;
    for (std::size_t i = 0; i < N; ++i) {
        const auto e = static_cast<E>(i);
        if (word == name(e)) return e;
        known += (i ? ", " : "") + std::string(name(e));
    }
    throw value_error(std::string(world_component), "unknown " + std::string(what) + " '" + std::string(word) + "' (known: " + known + ")");
}
}  // namespace detail

/// Label parsers; value_error "[world] unknown expression 'x' (known: ...)" otherwise.
inline expression parse_expression(std::string_view w) { return detail::parse_label<expression, 5>(w, "expression"); }
inline yaw_label parse_yaw(std::string_view w) { return detail::parse_label<yaw_label, 3>(w, "yaw"); }
inline pitch_label parse_pitch(std::string_view w) { return detail::parse_label<pitch_label, 3>(w, "pitch"); }
inline background_kind parse_background(std::string_view w) { return detail::parse_label<background_kind, 6>(w, "background"); }
inline accessories parse_accessories(std::string_view w) { return detail::parse_label<accessories, 4>(w, "accessories"); }

/// The yaw label of an angle: left <= -10 < front < 10 <= right.
inline yaw_label label_of_yaw(double yaw_degrees) {
    check(!std::isnan(yaw_degrees), world_component, "yaw must not be NaN");
    return yaw_degrees <= -10.0 ? yaw_label::left : (yaw_degrees >= 10.0 ? yaw_label::right : yaw_label::front);
}
/// The pitch label of an angle: up > 10, down < -10 (pose_from_angles' thresholds).
inline pitch_label label_of_pitch(double pitch_degrees) {
    check(!std::isnan(pitch_degrees), world_component, "pitch must not be NaN");
    return pitch_degrees > 10.0 ? pitch_label::up : (pitch_degrees < -10.0 ? pitch_label::down : pitch_label::front);
}
/// The nominal angles of the labels: yaw -35 / 0 / 35, pitch 20 / 0 / -20.
inline double yaw_of(yaw_label l) { return l == yaw_label::left ? -35.0 : (l == yaw_label::right ? 35.0 : 0.0); }
inline double pitch_of(pitch_label l) { return l == pitch_label::up ? 20.0 : (l == pitch_label::down ? -20.0 : 0.0); }

// ---------------------------------------------------------------------------
// Identities

/// The traits of identity `id` (any 64-bit number; the same on every run).
inline identity_traits identity(std::uint64_t id) {
    using detail::color;
    detail::random_stream r(detail::splitmix(id ^ 0x6a09e667f3bcc909ull));
    identity_traits t;
    t.id = id;
    t.face_width = r.range(0.86, 1.08);
    t.face_height = r.range(1.1, 1.4);
    t.jaw_roundness = r.uniform();
    t.chin_pointiness = r.uniform();
    // Skin: a continuous tone along light-to-dark anchors, plus a small warm/cool shift.
    static constexpr std::array<std::array<double, 3>, 6> skin_anchors{{{255, 224, 200}, {241, 194, 160}, {224, 172, 125},
                                                                         {190, 134, 92}, {141, 92, 60}, {92, 58, 40}}};
    t.skin_tone = r.uniform();
    {
        const double p = t.skin_tone * 5.0;
        const int i = std::min(4, static_cast<int>(p));
        const double f = p - i;
        const auto& a = skin_anchors[static_cast<std::size_t>(i)];
        const auto& b = skin_anchors[static_cast<std::size_t>(i + 1)];
        color c{detail::lerp(a[0], b[0], f), detail::lerp(a[1], b[1], f), detail::lerp(a[2], b[2], f)};
        const double warm = r.range(-8.0, 8.0);
        c.r += warm;
        c.b -= warm;
        t.skin = detail::to_rgb8(c);
    }
    static constexpr std::array<std::array<double, 3>, 9> hair_colors{{{24, 20, 18}, {58, 38, 26}, {100, 64, 38}, {150, 100, 56},
                                                                        {218, 184, 112}, {170, 74, 34}, {142, 142, 144}, {230, 228, 222},
                                                                        {74, 44, 64}}};
    {
        // Dark hair is common, grey and white rarer; very dark skin rarely pairs with blonde or red.
        const int pick = r.below(100);
        int k = pick < 26 ? 0 : pick < 48 ? 1 : pick < 62 ? 2 : pick < 72 ? 3 : pick < 82 ? 4 : pick < 88 ? 5 : pick < 94 ? 6 : pick < 97 ? 7 : 8;
        if (t.skin_tone > 0.7 && (k == 4 || k == 5)) k = 1;
        const auto& h = hair_colors[static_cast<std::size_t>(k)];
        const double j = r.range(0.88, 1.12);
        t.hair_color = detail::to_rgb8({h[0] * j, h[1] * j, h[2] * j});
    }
    {
        static constexpr std::array<int, 7> weights{8, 22, 14, 20, 12, 14, 10};
        const int pick = r.below(100);
        int acc = 0, s = 0;
        for (; s < 6; ++s) {
            acc += weights[static_cast<std::size_t>(s)];
            if (pick < acc) break;
        }
        t.hair = static_cast<hair_style>(s);
    }
    t.hair_volume = r.range(0.04, 0.14) + (t.hair == hair_style::curly ? 0.08 : 0.0);
    t.hairline = r.range(-1.0, 1.0);
    t.hair_part = r.range(-1.0, 1.0);
    static constexpr std::array<std::array<double, 3>, 6> eye_colors{
        {{70, 42, 22}, {40, 26, 16}, {70, 120, 180}, {80, 130, 70}, {120, 96, 50}, {110, 124, 134}}};
    {
        int k = r.below(6);
        if (t.skin_tone > 0.6 && k >= 2) k = r.below(2);
        const auto& e = eye_colors[static_cast<std::size_t>(k)];
        t.eyes = detail::to_rgb8({e[0], e[1], e[2]});
    }
    t.eye_size = r.range(0.8, 1.25);
    t.eye_spacing = r.range(0.32, 0.44);
    t.eye_height = r.range(-0.16, -0.04);
    t.nose_length = r.range(0.75, 1.3);
    t.nose_width = r.range(0.75, 1.35);
    t.brow_thickness = r.range(0.6, 1.7);
    t.brow_angle = r.range(-1.0, 1.0);
    t.mouth_width = r.range(0.24, 0.38);
    t.lip_fullness = r.range(0.6, 1.5);
    {
        const color skin = detail::to_color(t.skin);
        const color red{176, 70, 76};
        t.lips = detail::to_rgb8(detail::mix(detail::scale(skin, 0.8), red, r.range(0.2, 0.55)));
    }
    {
        const int pick = r.below(100);
        t.beard = pick < 64 ? beard_style::none : pick < 74 ? beard_style::stubble : pick < 86 ? beard_style::full
                : pick < 94 ? beard_style::moustache : beard_style::goatee;
    }
    t.freckles = t.skin_tone < 0.35 && r.chance(0.35);
    t.blush = r.chance(0.3);
    t.ear_size = r.range(0.8, 1.25);
    {
        const double hue = r.uniform();
        const double sat = r.range(0.25, 0.8), val = r.range(0.3, 0.9);
        // hsv -> rgb with this file's arithmetic only.
        const double h6 = hue * 6.0;
        const int sector = std::min(5, static_cast<int>(h6));
        const double f = h6 - sector;
        const double p = val * (1 - sat), q = val * (1 - sat * f), u = val * (1 - sat * (1 - f));
        const std::array<std::array<double, 3>, 6> rgb{{{val, u, p}, {q, val, p}, {p, val, u}, {p, q, val}, {u, p, val}, {val, p, q}}};
        const auto& c = rgb[static_cast<std::size_t>(sector)];
        t.shirt = detail::to_rgb8({c[0] * 255.0, c[1] * 255.0, c[2] * 255.0});
    }
    t.neckline = r.below(3);
    return t;
}

// ---------------------------------------------------------------------------
// Rasteriser: shapes are OR-ed into a coverage mask on a supersampled grid,
// then filled once, so overlapping pieces of one shape blend only once.

namespace detail {

class canvas {
public:
    canvas(int width, int height, int samples) : w_(width), h_(height), s_(samples), sw_(width * samples), sh_(height * samples) {
        px_.assign(static_cast<std::size_t>(sw_) * static_cast<std::size_t>(sh_) * 3, 0.0f);
        mask_.assign(static_cast<std::size_t>(sw_) * static_cast<std::size_t>(sh_), 0);
        reset_box();
    }
    int width() const { return w_; }
    int height() const { return h_; }

    /// A closed polygon (even-odd inside), pixel coordinates.
    void polygon(const std::vector<point>& p) {
        if (p.size() < 3) return;
        double y0 = p[0].y, y1 = p[0].y;
        for (const auto& q : p) y0 = std::min(y0, q.y), y1 = std::max(y1, q.y);
        // Samples sit at (j + 0.5) / s; rows whose centre lies in [y0, y1).
        const int j0 = std::max(0, static_cast<int>(std::ceil(y0 * s_ - 0.5)));
        const int j1 = std::min(sh_ - 1, static_cast<int>(std::ceil(y1 * s_ - 0.5)) - 1);
        xs_.clear();
        for (int j = j0; j <= j1; ++j) {
            const double y = (j + 0.5) / s_;
            xs_.clear();
            for (std::size_t i = 0, k = p.size() - 1; i < p.size(); k = i++) {
                const point& a = p[k];
                const point& b = p[i];
                if ((a.y <= y && y < b.y) || (b.y <= y && y < a.y)) xs_.push_back(a.x + (y - a.y) * (b.x - a.x) / (b.y - a.y));
            }
            std::sort(xs_.begin(), xs_.end());
            for (std::size_t i = 0; i + 1 < xs_.size(); i += 2) {
                const int i0 = std::max(0, static_cast<int>(std::ceil(xs_[i] * s_ - 0.5)));
                const int i1 = std::min(sw_ - 1, static_cast<int>(std::ceil(xs_[i + 1] * s_ - 0.5)) - 1);
                if (i1 < i0) continue;
                std::uint8_t* row = mask_.data() + static_cast<std::size_t>(j) * static_cast<std::size_t>(sw_);
                for (int x = i0; x <= i1; ++x) row[x] |= 1;
                bx0_ = std::min(bx0_, i0), bx1_ = std::max(bx1_, i1), by0_ = std::min(by0_, j), by1_ = std::max(by1_, j);
            }
        }
    }
    void ellipse(point c, double rx, double ry) { polygon(ellipse_points(c, rx, ry)); }
    void circle(point c, double r) { ellipse(c, r, r); }
    void rect(double x0, double y0, double x1, double y1) { polygon({{x0, y0}, {x1, y0}, {x1, y1}, {x0, y1}}); }

    /// A polyline of width `w0` at its start tapering linearly to `w1`, round joins.
    void stroke(const std::vector<point>& p, double w0, double w1 = -1.0) {
        if (w1 < 0) w1 = w0;
        const std::size_t n = p.size();
        for (std::size_t i = 0; i < n; ++i) {
            const double t = n > 1 ? static_cast<double>(i) / static_cast<double>(n - 1) : 0.0;
            const double wi = lerp(w0, w1, t) * 0.5;
            circle(p[i], wi);
            if (i + 1 == n) continue;
            const double t2 = static_cast<double>(i + 1) / static_cast<double>(n - 1);
            const double wj = lerp(w0, w1, t2) * 0.5;
            const double dx = p[i + 1].x - p[i].x, dy = p[i + 1].y - p[i].y;
            const double len = std::sqrt(dx * dx + dy * dy);
            if (len <= 0) continue;
            const double nx = -dy / len, ny = dx / len;
            polygon({{p[i].x + nx * wi, p[i].y + ny * wi}, {p[i + 1].x + nx * wj, p[i + 1].y + ny * wj},
                     {p[i + 1].x - nx * wj, p[i + 1].y - ny * wj}, {p[i].x - nx * wi, p[i].y - ny * wi}});
        }
    }

    /// Opaque vertical gradient over the full width of rows [y0, y1) (pixel units), ignoring the mask.
    void vertical_gradient(double y0, double y1, color top, color bottom) {
        const int j0 = std::max(0, static_cast<int>(std::ceil(y0 * s_ - 0.5)));
        const int j1 = std::min(sh_ - 1, static_cast<int>(std::ceil(y1 * s_ - 0.5)) - 1);
        for (int j = j0; j <= j1; ++j) {
            const color c = mix(top, bottom, clamp01(((j + 0.5) / s_ - y0) / (y1 - y0)));
            const float r = static_cast<float>(c.r), g = static_cast<float>(c.g), b = static_cast<float>(c.b);
            float* q = px_.data() + static_cast<std::size_t>(j) * static_cast<std::size_t>(sw_) * 3;
            for (int i = 0; i < sw_; ++i, q += 3) q[0] = r, q[1] = g, q[2] = b;
        }
    }

    /// Paints the mask with `c` at opacity `alpha`, then clears it.
    void fill(color c, double alpha = 1.0) {
        if (bx1_ >= bx0_) {
            const auto a = static_cast<float>(alpha);
            const float cr = static_cast<float>(c.r), cg = static_cast<float>(c.g), cb = static_cast<float>(c.b);
            for (int j = by0_; j <= by1_; ++j) {
                const std::size_t row = static_cast<std::size_t>(j) * static_cast<std::size_t>(sw_);
                for (int i = bx0_; i <= bx1_; ++i) {
                    const std::size_t k = row + static_cast<std::size_t>(i);
                    const std::uint8_t m = mask_[k];
                    if (!(m & 1)) continue;
                    mask_[k] = static_cast<std::uint8_t>(m & ~1);
                    if (clipping_ && !(m & 2)) continue;
                    float* q = px_.data() + k * 3;
                    q[0] += a * (cr - q[0]);
                    q[1] += a * (cg - q[1]);
                    q[2] += a * (cb - q[2]);
                }
            }
        }
        reset_box();
    }
    /// Paints the mask with colour f(x, y) (pixel coordinates), then clears it.
    template <class F>
    void fill_with(F f, double alpha = 1.0) {
        if (bx1_ >= bx0_) {
            const auto a = static_cast<float>(alpha);
            for (int j = by0_; j <= by1_; ++j) {
                for (int i = bx0_; i <= bx1_; ++i) {
                    const std::size_t k = static_cast<std::size_t>(j) * static_cast<std::size_t>(sw_) + static_cast<std::size_t>(i);
                    const std::uint8_t m = mask_[k];
                    if (!(m & 1)) continue;
                    mask_[k] = static_cast<std::uint8_t>(m & ~1);
                    if (clipping_ && !(m & 2)) continue;
                    const color c = f((i + 0.5) / s_, (j + 0.5) / s_);
                    float* q = px_.data() + k * 3;
                    q[0] += a * (static_cast<float>(c.r) - q[0]);
                    q[1] += a * (static_cast<float>(c.g) - q[1]);
                    q[2] += a * (static_cast<float>(c.b) - q[2]);
                }
            }
        }
        reset_box();
    }
    /// Turns the current mask into the clip region for later fills.
    void clip_to_mask() {
        clear_clip();
        for (int j = by0_; j <= by1_; ++j)
            for (int i = bx0_; i <= bx1_; ++i) {
                auto& m = mask_[static_cast<std::size_t>(j) * static_cast<std::size_t>(sw_) + static_cast<std::size_t>(i)];
                if (m & 1) m = 2;
            }
        cx0_ = bx0_, cx1_ = bx1_, cy0_ = by0_, cy1_ = by1_;
        clipping_ = true;
        reset_box();
    }
    void clear_clip() {
        if (!clipping_) return;
        for (int j = cy0_; j <= cy1_; ++j)
            for (int i = cx0_; i <= cx1_; ++i)
                mask_[static_cast<std::size_t>(j) * static_cast<std::size_t>(sw_) + static_cast<std::size_t>(i)] &= 1;
        clipping_ = false;
    }

    /// Box-filters the samples down to 8-bit pixels.
    std::vector<std::uint8_t> resolve() const {
        std::vector<std::uint8_t> out(static_cast<std::size_t>(w_) * static_cast<std::size_t>(h_) * 3);
        std::vector<float> acc(static_cast<std::size_t>(w_) * 3);
        const float inv = 1.0f / static_cast<float>(s_ * s_);
        for (int y = 0; y < h_; ++y) {
            std::fill(acc.begin(), acc.end(), 0.0f);
            for (int j = 0; j < s_; ++j) {
                const float* row = px_.data() + static_cast<std::size_t>(y * s_ + j) * static_cast<std::size_t>(sw_) * 3;
                for (int x = 0; x < w_; ++x)
                    for (int i = 0; i < s_; ++i)
                        for (int c = 0; c < 3; ++c)
                            acc[static_cast<std::size_t>(x * 3 + c)] += row[static_cast<std::size_t>((x * s_ + i) * 3 + c)];
            }
            std::uint8_t* o = out.data() + static_cast<std::size_t>(y) * static_cast<std::size_t>(w_) * 3;
            for (std::size_t k = 0; k < acc.size(); ++k) {
                const float v = acc[k] * inv;
                o[k] = static_cast<std::uint8_t>(v <= 0.0f ? 0.0f : (v >= 255.0f ? 255.0f : std::floor(v + 0.5f)));
            }
        }
        return out;
    }

    std::vector<point> ellipse_points(point c, double rx, double ry) const {
        const double r = std::max(std::abs(rx), std::abs(ry)) * s_;
        const int n = std::clamp(static_cast<int>(r * 1.5), 10, 96);
        std::vector<point> p(static_cast<std::size_t>(n));
        for (int i = 0; i < n; ++i) {
            const double a = 2.0 * pi * i / n;
            p[static_cast<std::size_t>(i)] = {c.x + rx * cosine(a), c.y + ry * sine(a)};
        }
        return p;
    }

private:
    void reset_box() { bx0_ = sw_, by0_ = sh_, bx1_ = -1, by1_ = -1; }

    int w_, h_, s_, sw_, sh_;
    std::vector<float> px_;
    std::vector<std::uint8_t> mask_;
    std::vector<double> xs_;
    int bx0_ = 0, by0_ = 0, bx1_ = -1, by1_ = -1;
    int cx0_ = 0, cy0_ = 0, cx1_ = -1, cy1_ = -1;
    bool clipping_ = false;
};

}  // namespace detail

// ---------------------------------------------------------------------------
// Face geometry: head units -> pixels, and every feature's outline.

namespace detail {

/// How an expression moves the features (head units unless noted).
struct expression_shape {
    double eye_open;     ///< lid opening, relative
    double brow_lift;    ///< whole brow up
    double brow_inner;   ///< inner ends down (+) or up (-)
    double mouth_curve;  ///< corners up (+) or down (-)
    double mouth_open;   ///< lip gap
    double mouth_width;  ///< relative
    int teeth;           ///< 0 none, 1 upper row, 2 both rows (clenched)
};

inline expression_shape shape_of(expression e) {
    switch (e) {
        case expression::happy: return {0.72, 0.03, 0.0, 0.15, 0.10, 1.14, 1};
        case expression::sad: return {0.8, 0.0, -0.11, -0.13, 0.0, 0.9, 0};
        case expression::surprised: return {1.45, 0.13, -0.02, 0.0, 0.26, 0.55, 0};
        case expression::angry: return {0.78, -0.05, 0.12, -0.05, 0.045, 0.92, 2};
        case expression::neutral: break;
    }
    return {1.0, 0.0, 0.0, 0.015, 0.0, 1.0, 0};
}

/// One face's projection and feature outlines.
class face_geometry {
public:
    face_geometry(const face_spec& f, int width, int height) : f_(f), t_(f.traits), x_(shape_of(f.motion.expression)) {
        const double yaw = radians(f.motion.yaw_degrees), pitch = radians(f.motion.pitch_degrees);
        sy_ = sine(yaw), cy_ = cosine(yaw), sp_ = sine(pitch), cp_ = cosine(pitch);
        a_ = t_.face_width;
        ye_ = t_.eye_height;
        yc_ = ye_ + t_.face_height;
        ytop_ = ye_ - 0.95;
        yt_ = ye_ + 0.02;
        yn_ = ye_ + 0.30 + 0.14 * (t_.nose_length - 1.0);
        ym_ = yn_ + 0.36 * (yc_ - yn_) + 0.02;
        r_ = f.scale * height / (yc_ - ytop_);
        ox_ = f.center_x * width;
        oy_ = f.center_y * height - ye_ * r_;
        // The skull outline must hold the forehead whatever the pitch: grow its height until it does.
        const double h = (ye_ + 0.35 - (ytop_ - 0.05)) * 0.5;
        skull_hh_ = r_ * std::sqrt(h * h * cp_ * cp_ + 0.9 * sp_ * sp_);
        const point c = skull_center();
        const double hw = skull_half_width();
        double k = 1.0;
        for (int i = 1; i < 16; ++i) {
            const point p = forehead(i / 16.0);
            const double dx = (p.x - c.x) / hw, dy = (p.y - c.y) / skull_hh_;
            if (dy < 0.0 && dx * dx < 0.9) k = std::max(k, std::sqrt(dy * dy / (1.0 - dx * dx)) * 1.04);
        }
        // Grow upwards only: the bottom stays where it was.
        skull_dy_ = -(k - 1.0) * skull_hh_ * 0.5;
        skull_hh_ *= (1.0 + k) * 0.5;
    }

    const face_spec& spec() const { return f_; }
    const identity_traits& traits() const { return t_; }
    const expression_shape& shape() const { return x_; }
    double unit() const { return r_; }
    double sin_yaw() const { return sy_; }
    double sin_pitch() const { return sp_; }

    /// Depth of the face surface at (X, Y).
    double depth(double X, double Y) const {
        const double u = X / a_, v = Y / 1.3;
        return 0.95 * std::sqrt(std::max(0.12, 1.0 - 0.85 * u * u - 0.3 * v * v));
    }
    /// A 3-D head point in pixels.
    point project3(double X, double Y, double Z) const {
        const double x1 = X * cy_ + Z * sy_;
        const double z1 = -X * sy_ + Z * cy_;
        const double y1 = Y * cp_ - z1 * sp_;
        return {ox_ + r_ * x1, oy_ + r_ * y1};
    }
    /// A point on the face surface, raised by `lift` (noses, lips).
    point on_face(double X, double Y, double lift = 0.0) const { return project3(X, Y, depth(X, Y) + lift); }
    /// Screen-facing component of a head-space direction after rotation.
    double facing(double nx, double ny, double nz) const {
        const double z1 = -nx * sy_ + nz * cy_;
        return ny * sp_ + z1 * cp_;
    }

    /// Jaw contour, left side (side = -1) or right (+1); s in [0, 1] from temple to chin.
    point contour(int side, double s) const {
        const double al = s * (pi / 2);
        const double ca = cosine(al), sa = sine(al);
        double w = lerp(std::sqrt(std::max(0.0, ca)), ca, 0.35 + 0.65 * t_.jaw_roundness);
        w *= 1.0 - 0.12 * sa;
        const double s4 = sa * sa * sa * sa;
        w *= 1.0 - (0.1 + 0.3 * t_.chin_pointiness) * s4 * (1.0 - ca);
        return on_face(side * a_ * w, yt_ + (yc_ - yt_) * sa);
    }
    /// Forehead arc from the left temple (s = 0) over the top to the right temple (s = 1).
    point forehead(double s) const {
        const double b = s * pi;
        return on_face(-a_ * cosine(b) * (1.0 - 0.06 * sine(b)), yt_ - (yt_ - ytop_) * sine(b));
    }
    /// The face outline (contour then forehead), closed.
    std::vector<point> outline() const {
        std::vector<point> p;
        constexpr int n = 64;
        for (int i = 0; i <= n; ++i) p.push_back(contour(-1, static_cast<double>(i) / n));
        for (int i = n - 1; i >= 0; --i) p.push_back(contour(1, static_cast<double>(i) / n));
        for (int i = n - 1; i >= 1; --i) p.push_back(forehead(static_cast<double>(i) / n));
        return p;
    }

    // Eyes: side -1 is the viewer-left eye.
    double eye_x(int side) const { return side * t_.eye_spacing; }
    double eye_half_width() const { return 0.165 * t_.eye_size; }
    double eye_half_height() const { return 0.082 * t_.eye_size * x_.eye_open; }
    double iris_radius() const { return 0.078 * t_.eye_size; }
    /// Lid point, t in [-1, 1] from the eye's left corner to its right corner.
    point lid(int side, double t, bool upper) const {
        const double q = std::max(0.0, 1.0 - t * t);
        const double outer = side < 0 ? -t : t;  // +1 at the outer corner
        double y = ye_ - 0.012 * outer;
        if (upper) y -= eye_half_height() * (0.6 * std::sqrt(q) + 0.4 * q) * (1.0 + 0.12 * (outer < 0 ? -outer : 0));
        else y += 0.72 * eye_half_height() * q;
        return on_face(eye_x(side) + eye_half_width() * t, y, 0.0);
    }
    std::vector<point> eye_outline(int side) const {
        std::vector<point> p;
        constexpr int n = 16;
        for (int i = 0; i <= n; ++i) p.push_back(lid(side, -1.0 + 2.0 * i / n, true));
        for (int i = n - 1; i >= 1; --i) p.push_back(lid(side, -1.0 + 2.0 * i / n, false));
        return p;
    }
    std::vector<point> eye_ring(int side, double rx, double ry, double dy = 0.0) const {
        std::vector<point> p;
        constexpr int n = 24;
        for (int i = 0; i < n; ++i) {
            const double b = 2.0 * pi * i / n;
            p.push_back(on_face(eye_x(side) + rx * cosine(b), ye_ + dy + ry * sine(b), 0.0));
        }
        return p;
    }
    point pupil(int side) const { return on_face(eye_x(side), ye_ + 0.004, 0.0); }

    // Brows: t in [0, 1] from the inner end to the outer end.
    point brow(int side, double t, double edge) const {
        const double inner_x = eye_x(side) - side * 0.15, outer_x = eye_x(side) + side * 0.23;
        const double thick = lerp(0.075, 0.035, t) * t_.brow_thickness;
        double y = ye_ - 0.19 - 0.03 * t_.eye_size - x_.brow_lift;
        y += x_.brow_inner * (1.0 - t) * (1.0 - t);
        y -= 0.05 * t_.brow_angle * t;
        y -= (0.04 + 0.04 * (x_.brow_lift > 0.1 ? 1.0 : 0.0)) * 4.0 * t * (1.0 - t) * 0.8;
        y += edge * thick * 0.5;
        return on_face(lerp(inner_x, outer_x, t), y, 0.01);
    }
    std::vector<point> brow_outline(int side) const {
        std::vector<point> p;
        constexpr int n = 12;
        for (int i = 0; i <= n; ++i) p.push_back(brow(side, static_cast<double>(i) / n, -1.0));
        for (int i = n; i >= 0; --i) p.push_back(brow(side, static_cast<double>(i) / n, 1.0));
        return p;
    }

    // Nose.
    double nose_lift() const { return 0.15 + 0.06 * t_.nose_length; }
    double nose_half_width() const { return 0.115 * t_.nose_width; }
    point nose_bridge(double k) const { return on_face(0.0, lerp(ye_, yn_, k), lerp(0.03, nose_lift(), k * k)); }
    point nose_side(int side, double k) const {
        return on_face(side * lerp(0.045, nose_half_width() * 0.85, k), lerp(ye_ + 0.1, yn_ - 0.01, k), nose_lift() * (0.45 - 0.3 * k));
    }
    point nose_base(double t) const {  // t in [-1, 1], left wing to right wing
        const double q = 1.0 - t * t;
        return on_face(t * nose_half_width(), yn_ + 0.025 + 0.035 * q, 0.03 + nose_lift() * 0.55 * q * q);
    }
    point nose_tip() const { return nose_bridge(1.0); }
    double nose_y() const { return yn_; }

    // Mouth: t in [-1, 1] from the left corner to the right corner.
    double mouth_half_width() const { return t_.mouth_width * x_.mouth_width; }
    double mouth_center(double t) const { return ym_ - x_.mouth_curve * t * t; }
    double gap(double t) const {
        const double q = std::max(0.0, 1.0 - t * t);
        return x_.mouth_open * (x_.mouth_width < 0.7 ? std::sqrt(q) : q);
    }
    double inner_upper_y(double t) const { return mouth_center(t) - gap(t) * (x_.teeth == 1 ? 0.2 : 0.5); }
    double inner_lower_y(double t) const { return mouth_center(t) + gap(t) * (x_.teeth == 1 ? 0.8 : 0.5); }
    double outer_upper_y(double t) const {
        const double q = std::max(0.0, 1.0 - t * t);
        const double bow = std::max(0.0, 1.0 - (t / 0.28) * (t / 0.28));
        return inner_upper_y(t) - 0.042 * t_.lip_fullness * std::sqrt(q) * (1.0 - 0.3 * bow);
    }
    double outer_lower_y(double t) const {
        const double q = std::max(0.0, 1.0 - t * t);
        return inner_lower_y(t) + 0.058 * t_.lip_fullness * std::sqrt(q);
    }
    point mouth_point(double t, double y) const {
        return on_face(mouth_half_width() * t, y, 0.05 * (1.0 - t * t));
    }
    double mouth_y() const { return ym_; }

    // Head outline for hair, hats and ears (a screen ellipse).
    point skull_center() const {
        const point c = project3(0.0, skull_y(), -0.15);
        return {c.x, c.y + skull_dy_};
    }
    double skull_y() const { return (ytop_ - 0.05 + ye_ + 0.35) * 0.5; }
    double skull_half_width() const {
        const double w = a_ * 1.03;
        return r_ * std::sqrt(w * w * cy_ * cy_ + 1.0 * sy_ * sy_);
    }
    double skull_half_height() const { return skull_hh_; }
    point skull_point(double angle, double grow) const {
        const point c = skull_center();
        return {c.x + skull_half_width() * grow * cosine(angle), c.y + skull_half_height() * grow * sine(angle)};
    }

    double face_width() const { return a_; }
    double eye_y() const { return ye_; }
    double chin_y() const { return yc_; }
    double top_y() const { return ytop_; }
    double temple_y() const { return yt_; }

private:
    face_spec f_;
    identity_traits t_;
    expression_shape x_;
    double sy_ = 0, cy_ = 1, sp_ = 0, cp_ = 1;
    double a_ = 1, ye_ = 0, yc_ = 1, ytop_ = -1, yt_ = 0, yn_ = 0.3, ym_ = 0.6;
    double r_ = 1, ox_ = 0, oy_ = 0;
    double skull_hh_ = 1, skull_dy_ = 0;
};

}  // namespace detail

/// The ground truth of a face as `render` would draw it (no pixels needed).
inline face_truth face_ground_truth(const face_spec& f, int width, int height) {
    const detail::face_geometry g(f, width, height);
    face_truth t;
    t.yaw_degrees = f.motion.yaw_degrees;
    t.pitch_degrees = f.motion.pitch_degrees;
    auto& L = t.landmarks;
    const auto put = [&L](int i, detail::point p) { L[static_cast<std::size_t>(i)] = {p.x, p.y}; };
    // Contour, spatial order from the left temple round the chin to the right temple.
    static constexpr std::array<int, 33> contour_order{1,  9,  10, 11, 12, 13, 14, 15, 16, 2,  3,  4,  5,  6,  7,  8, 0,
                                                       24, 23, 22, 21, 20, 19, 18, 32, 31, 30, 29, 28, 27, 26, 25, 17};
    for (int k = 0; k < 33; ++k)
        put(contour_order[static_cast<std::size_t>(k)], k <= 16 ? g.contour(-1, k / 16.0) : g.contour(1, (32 - k) / 16.0));
    // Eyes: left eye at 33.., right eye at the same layout plus 54.
    for (int side = -1; side <= 1; side += 2) {
        const int o = side < 0 ? 0 : 54;
        put(35 + o, g.lid(side, -1.0, true));
        put(41 + o, g.lid(side, -0.5, true));
        put(40 + o, g.lid(side, 0.0, true));
        put(42 + o, g.lid(side, 0.5, true));
        put(39 + o, g.lid(side, 1.0, true));
        put(37 + o, g.lid(side, 0.5, false));
        put(33 + o, g.lid(side, 0.0, false));
        put(36 + o, g.lid(side, -0.5, false));
        put(38 + o, g.pupil(side));
        const double top = std::max(g.eye_y() - g.iris_radius(), g.eye_y() - g.eye_half_height() * 0.95);
        put(34 + o, g.on_face(g.eye_x(side), top));
    }
    // Brows: left brow listed left to right is outer to inner.
    {
        const std::array<int, 5> up{43, 48, 49, 51, 50};
        const std::array<int, 4> lo{44, 45, 46, 47};
        for (int i = 0; i < 5; ++i) put(up[static_cast<std::size_t>(i)], g.brow(-1, 1.0 - i / 4.0, -1.0));
        for (int i = 0; i < 4; ++i) put(lo[static_cast<std::size_t>(i)], g.brow(-1, 1.0 - (i + 0.5) / 4.0, 1.0));
        const std::array<int, 5> up2{102, 103, 104, 105, 101};
        const std::array<int, 4> lo2{97, 98, 99, 100};
        for (int i = 0; i < 5; ++i) put(up2[static_cast<std::size_t>(i)], g.brow(1, i / 4.0, -1.0));
        for (int i = 0; i < 4; ++i) put(lo2[static_cast<std::size_t>(i)], g.brow(1, (i + 0.5) / 4.0, 1.0));
    }
    // Nose.
    put(72, g.nose_bridge(0.0));
    put(73, g.nose_bridge(1.0 / 3.0));
    put(74, g.nose_bridge(2.0 / 3.0));
    put(86, g.nose_tip());
    for (int i = 0; i < 3; ++i) {
        put(75 + i, g.nose_side(-1, (i + 1) / 3.0));
        put(81 + i, g.nose_side(1, (i + 1) / 3.0));
    }
    put(78, g.nose_base(-1.0));
    put(79, g.nose_base(-0.5));
    put(80, g.nose_base(0.0));
    put(85, g.nose_base(0.5));
    put(84, g.nose_base(1.0));
    // Mouth.
    {
        const auto up = [&](double s) { return g.mouth_point(s, g.outer_upper_y(s)); };
        const auto lo = [&](double s) { return g.mouth_point(s, g.outer_lower_y(s)); };
        const auto iu = [&](double s) { return g.mouth_point(s, g.inner_upper_y(s)); };
        const auto il = [&](double s) { return g.mouth_point(s, g.inner_lower_y(s)); };
        put(52, up(-1.0));
        put(64, up(-2.0 / 3.0));
        put(63, up(-1.0 / 3.0));
        put(71, up(0.0));
        put(67, up(1.0 / 3.0));
        put(68, up(2.0 / 3.0));
        put(61, up(1.0));
        put(58, lo(2.0 / 3.0));
        put(59, lo(1.0 / 3.0));
        put(53, lo(0.0));
        put(56, lo(-1.0 / 3.0));
        put(55, lo(-2.0 / 3.0));
        put(65, g.mouth_point(-0.9, 0.5 * (g.inner_upper_y(-0.9) + g.inner_lower_y(-0.9))));
        put(69, g.mouth_point(0.9, 0.5 * (g.inner_upper_y(0.9) + g.inner_lower_y(0.9))));
        put(66, iu(-0.45));
        put(62, iu(0.0));
        put(70, iu(0.45));
        put(57, il(0.45));
        put(60, il(0.0));
        put(54, il(-0.45));
    }
    t.kps5 = {L[38], L[92], L[86], L[52], L[61]};
    double x0 = 1e300, y0 = 1e300, x1 = -1e300, y1 = -1e300;
    for (const auto& p : g.outline()) x0 = std::min(x0, p.x), y0 = std::min(y0, p.y), x1 = std::max(x1, p.x), y1 = std::max(y1, p.y);
    t.box = {x0, y0, x1, y1};
    return t;
}

// ---------------------------------------------------------------------------
// Drawing

namespace detail {

inline constexpr std::array<std::array<double, 3>, 8> plain_colors{
    {{120, 160, 210}, {150, 196, 150}, {190, 190, 196}, {236, 184, 196}, {240, 222, 140}, {238, 170, 110}, {176, 150, 210}, {236, 236, 232}}};
inline constexpr std::array<std::string_view, 8> plain_names{"blue", "green", "grey", "pink", "yellow", "orange", "purple", "white"};

inline color rgb(double r, double g, double b) { return {r, g, b}; }

inline void draw_background(canvas& cv, background_kind kind, std::uint64_t seed) {
    const double W = cv.width(), H = cv.height();
    random_stream r(splitmix(seed ^ 0x3c6ef372fe94f82bull));
    const auto vertical = [&](double y0, double y1, color top, color bottom) { cv.vertical_gradient(y0, y1, top, bottom); };
    const color sky_top = rgb(110, 165, 225), sky_low = rgb(196, 222, 244);
    switch (kind) {
        case background_kind::plain: {
            const auto& c = plain_colors[seed % plain_colors.size()];
            const color base = rgb(c[0], c[1], c[2]);
            vertical(0, H, scale(base, 1.04), scale(base, 0.88));
            break;
        }
        case background_kind::beach: {
            const double horizon = H * r.range(0.36, 0.48), shore = horizon + H * r.range(0.1, 0.18);
            vertical(0, horizon, sky_top, sky_low);
            cv.circle({W * r.range(0.1, 0.9), H * r.range(0.06, 0.2)}, H * 0.06);
            cv.fill(rgb(255, 244, 200));
            vertical(horizon, shore, rgb(40, 110, 170), rgb(70, 160, 190));
            cv.rect(0, shore - H * 0.012, W, shore + H * 0.01);
            cv.fill(rgb(240, 248, 250), 0.8);
            vertical(shore, H, rgb(232, 212, 160), rgb(214, 186, 130));
            break;
        }
        case background_kind::forest: {
            vertical(0, H, rgb(150, 190, 170), rgb(190, 214, 190));
            for (int layer = 0; layer < 3; ++layer) {
                const color g = mix(rgb(120, 160, 120), rgb(30, 80, 40), layer / 2.0);
                const int n = 5 + layer * 2;
                for (int i = 0; i < n; ++i) {
                    const double x = W * (i + r.range(0.0, 1.0)) / n, base = H * r.range(0.55, 0.75) + layer * H * 0.06;
                    const double w = W * r.range(0.08, 0.14) * (1.0 + 0.25 * layer), top = base - H * r.range(0.35, 0.6);
                    cv.rect(x - w * 0.12, base - H * 0.05, x + w * 0.12, base + H * 0.2);
                    cv.fill(scale(rgb(90, 60, 40), 1.0 - 0.2 * layer));
                    cv.polygon({{x, top}, {x + w, base}, {x - w, base}});
                    cv.fill(mix(g, scale(g, 0.9), r.uniform()));
                }
            }
            vertical(H * 0.82, H, rgb(70, 110, 50), rgb(50, 80, 36));
            break;
        }
        case background_kind::city: {
            vertical(0, H, rgb(150, 185, 220), rgb(215, 225, 235));
            double x = -W * r.range(0.0, 0.1);
            while (x < W) {
                const double w = W * r.range(0.12, 0.24), top = H * r.range(0.08, 0.45);
                const double shade = r.range(0.45, 0.8);
                cv.rect(x, top, x + w, H);
                cv.fill(rgb(150 * shade + 40, 150 * shade + 38, 160 * shade + 40));
                const double step = std::max(W * 0.035, 3.0);
                for (double wy = top + step * 0.6; wy < H * 0.85; wy += step * 1.4)
                    for (double wx = x + step * 0.5; wx < x + w - step * 0.6; wx += step * 1.3) cv.rect(wx, wy, wx + step * 0.6, wy + step * 0.7);
                cv.fill(rgb(235, 225, 170), 0.7);
                x += w + W * r.range(0.0, 0.03);
            }
            vertical(H * 0.86, H, rgb(90, 90, 96), rgb(70, 70, 74));
            break;
        }
        case background_kind::room: {
            const auto& c = plain_colors[seed % plain_colors.size()];
            const color wall = mix(rgb(c[0], c[1], c[2]), rgb(235, 225, 210), 0.5);
            const double floor = H * r.range(0.72, 0.82);
            vertical(0, floor, wall, scale(wall, 0.9));
            vertical(floor, H, rgb(150, 110, 75), rgb(120, 85, 55));
            const double wx = W * r.range(0.05, 0.6), wy = H * r.range(0.08, 0.2), ww = W * r.range(0.25, 0.35), wh = H * 0.3;
            cv.rect(wx - W * 0.015, wy - W * 0.015, wx + ww + W * 0.015, wy + wh + W * 0.015);
            cv.fill(rgb(245, 245, 240));
            cv.rect(wx, wy, wx + ww, wy + wh);
            cv.fill_with([&](double, double y) { return mix(sky_top, sky_low, clamp01((y - wy) / wh)); });
            cv.rect(wx + ww * 0.48, wy, wx + ww * 0.52, wy + wh);
            cv.fill(rgb(245, 245, 240));
            const double px = W * r.range(0.1, 0.8), py = H * r.range(0.1, 0.3);
            cv.rect(px, py, px + W * 0.12, py + H * 0.14);
            cv.fill(rgb(110, 80, 50));
            cv.rect(px + W * 0.012, py + H * 0.014, px + W * 0.108, py + H * 0.126);
            cv.fill(mix(rgb(200, 120, 80), rgb(80, 140, 160), r.uniform()));
            break;
        }
        case background_kind::mountains: {
            vertical(0, H, sky_top, sky_low);
            for (int layer = 0; layer < 2; ++layer) {
                std::vector<point> p{{0, H}};
                const int n = 4 + layer * 2;
                for (int i = 0; i <= n; ++i)
                    p.push_back({W * i / n, H * (i % 2 ? r.range(0.2, 0.35) : r.range(0.45, 0.58)) + layer * H * 0.12});
                p.push_back({W, H});
                cv.polygon(p);
                cv.fill(layer ? rgb(90, 110, 120) : rgb(140, 150, 170));
            }
            vertical(H * 0.78, H, rgb(110, 150, 70), rgb(80, 120, 50));
            break;
        }
    }
}

inline void draw_face(canvas& cv, const face_geometry& g) {
    const identity_traits& t = g.traits();
    const face_spec& f = g.spec();
    const expression_shape& x = g.shape();
    const double R = g.unit();
    const color skin = to_color(t.skin), hair = to_color(t.hair_color), shadow = scale(skin, 0.78);
    const color dark_line = mix(scale(skin, 0.35), rgb(30, 20, 20), 0.6);
    random_stream r(splitmix(t.id ^ 0xa54ff53a5f1d36f1ull));  // per-identity details (freckles, curls)
    const point sc = g.skull_center();
    const double hw = g.skull_half_width(), hh = g.skull_half_height();
    const double vol = 1.0 + t.hair_volume;
    const point chin = g.on_face(0.0, g.chin_y());

    // Hair behind the head.
    if (t.hair == hair_style::long_hair || t.hair == hair_style::bob) {
        const bool longer = t.hair == hair_style::long_hair;
        const double bottom = longer ? chin.y + R * 0.55 : g.on_face(0.0, g.chin_y() - 0.25).y;
        const double spread = longer ? 1.12 : 1.06;
        std::vector<point> p;
        for (int i = 0; i <= 24; ++i) p.push_back(g.skull_point(-pi * i / 24.0, vol + 0.04));
        p.push_back({sc.x - hw * (vol + 0.04) * spread, bottom});
        for (int i = 1; i < 8; ++i) p.push_back({lerp(sc.x - hw * vol * spread, sc.x + hw * vol * spread, i / 8.0), bottom + R * 0.05 * ((i % 2) ? 1 : -1)});
        p.push_back({sc.x + hw * (vol + 0.04) * spread, bottom});
        cv.polygon(p);
        cv.fill(scale(hair, 0.82));
    }
    // Body and neck.
    {
        const point neck_top = g.project3(0.0, g.chin_y() - 0.45, 0.0);
        const double shoulders = chin.y + R * 0.45 + R * 0.25;
        const double bx = lerp(sc.x, neck_top.x, 0.4);
        std::vector<point> body;
        for (int i = 0; i <= 20; ++i) {
            const double b = pi + pi * i / 20.0;
            body.push_back({bx + R * 1.9 * cosine(b), shoulders + R * 0.75 + R * 0.75 * sine(b)});
        }
        body.push_back({bx + R * 2.0, cv.height() + R});
        body.push_back({bx - R * 2.0, cv.height() + R});
        cv.polygon(body);
        const color shirt = to_color(t.shirt);
        cv.fill_with([&](double px, double py) {
            const double u = (px - bx) / (R * 1.9);
            return scale(shirt, 1.0 - 0.18 * u * u - 0.04 * (py - shoulders) / R);
        });
        const double nw = R * 0.44 * g.face_width();
        cv.polygon({{neck_top.x - nw, neck_top.y}, {neck_top.x + nw, neck_top.y}, {bx + nw * 1.1, shoulders + R * 0.1}, {bx - nw * 1.1, shoulders + R * 0.1}});
        cv.fill(scale(skin, 0.86));
        if (t.neckline == 1) {
            cv.polygon({{bx - nw * 1.1, shoulders - R * 0.02}, {bx + nw * 1.1, shoulders - R * 0.02}, {bx, shoulders + R * 0.55}});
            cv.fill(scale(skin, 0.9));
        } else if (t.neckline == 2) {
            cv.polygon({{bx - nw * 1.3, shoulders - R * 0.05}, {bx, shoulders + R * 0.3}, {bx - nw * 0.3, shoulders + R * 0.42}});
            cv.polygon({{bx + nw * 1.3, shoulders - R * 0.05}, {bx, shoulders + R * 0.3}, {bx + nw * 0.3, shoulders + R * 0.42}});
            cv.fill(rgb(245, 245, 245));
        } else {
            cv.ellipse({bx, shoulders + R * 0.02}, nw * 1.15, R * 0.14);
            cv.fill(scale(skin, 0.86));
        }
    }
    // Skull and ears.
    cv.ellipse(sc, hw, hh);
    cv.fill(skin);
    for (int side = -1; side <= 1; side += 2) {
        if (g.facing(side, 0.0, 0.0) < -0.25) continue;
        const point e = g.project3(side * g.face_width() * 0.98, g.eye_y() + 0.16, -0.05);
        const double ex = R * 0.085 * t.ear_size, ey = R * 0.17 * t.ear_size;
        cv.ellipse(e, ex, ey);
        cv.fill(scale(skin, 0.93));
        cv.ellipse({e.x + side * ex * 0.1, e.y}, ex * 0.5, ey * 0.6);
        cv.fill(shadow, 0.5);
    }
    // Face, lit from the upper left, darker toward the rim.
    {
        const auto outline = g.outline();
        const point fc = g.on_face(0.0, (g.top_y() + g.chin_y()) * 0.5);
        const double fw = R * g.face_width(), fh = R * (g.chin_y() - g.top_y()) * 0.5;
        cv.polygon(outline);
        cv.fill_with([&](double px, double py) {
            const double u = (px - fc.x) / fw, v = (py - fc.y) / fh;
            const double d = u * u + v * v;
            return scale(skin, 1.02 - 0.16 * std::max(0.0, d - 0.35) - 0.04 * u - 0.03 * v);
        });
        // Shadow under the jaw line on the neck side is implied by the neck's darker tone.
    }
    // Cheeks.
    if (t.blush || f.motion.expression == expression::happy) {
        for (int side = -1; side <= 1; side += 2) {
            std::vector<point> p;
            for (int i = 0; i < 16; ++i) {
                const double b = 2.0 * pi * i / 16.0;
                p.push_back(g.on_face(side * 0.52 + 0.13 * cosine(b), g.nose_y() - 0.04 + 0.07 * sine(b)));
            }
            cv.polygon(p);
        }
        cv.fill(rgb(230, 110, 110), (t.blush ? 0.16 : 0.0) + (f.motion.expression == expression::happy ? 0.12 : 0.0));
    }
    if (t.freckles) {
        for (int i = 0; i < 14; ++i) {
            const int side = i % 2 ? 1 : -1;
            const point p = g.on_face(side * r.range(0.22, 0.6), r.range(g.eye_y() + 0.12, g.nose_y() + 0.04));
            cv.circle(p, std::max(0.35, R * 0.018));
        }
        cv.fill(scale(skin, 0.68), 0.65);
    }
    // Beard.
    const auto mouth_outer = [&](double y_extra) {
        std::vector<point> p;
        for (int i = 0; i <= 16; ++i) {
            const double s = -1.0 + 2.0 * i / 16.0;
            p.push_back(g.mouth_point(s, g.outer_upper_y(s) - y_extra));
        }
        return p;
    };
    if (t.beard == beard_style::full || t.beard == beard_style::stubble) {
        std::vector<point> p;
        const double s0 = 0.2;
        for (int i = 0; i <= 20; ++i) p.push_back(g.contour(-1, lerp(s0, 1.0, i / 20.0)));
        for (int i = 19; i >= 0; --i) p.push_back(g.contour(1, lerp(s0, 1.0, i / 20.0)));
        const double ys = g.temple_y() + (g.chin_y() - g.temple_y()) * sine(s0 * pi / 2);
        for (int i = 1; i < 20; ++i) {
            const double u = 1.0 - 2.0 * i / 20.0;
            const double y = lerp(g.nose_y() + 0.07, ys, u * u);
            p.push_back(g.on_face(u * g.face_width() * 0.95, y, 0.02));
        }
        cv.polygon(p);
        cv.fill(scale(hair, 0.9), t.beard == beard_style::full ? 0.92 : 0.3);
    }
    // Nose: side shadow (the profile line when turned), base, nostrils, highlight.
    {
        const int far = g.sin_yaw() >= 0.0 ? 1 : -1;
        std::vector<point> side;
        for (int i = 0; i <= 8; ++i) side.push_back(g.nose_side(far, i / 8.0));
        cv.stroke(side, R * 0.03, R * 0.045);
        cv.fill(shadow, 0.35 + 0.45 * std::abs(g.sin_yaw()));
        std::vector<point> base;
        for (int i = 0; i <= 12; ++i) base.push_back(g.nose_base(-1.0 + 2.0 * i / 12.0));
        cv.stroke(base, R * 0.035);
        cv.fill(scale(skin, 0.62), 0.55);
        for (int s2 = -1; s2 <= 1; s2 += 2) {
            const point n = g.on_face(s2 * g.nose_half_width() * 0.5, g.nose_y() + 0.045, g.nose_lift() * 0.35);
            cv.ellipse(n, R * 0.035, R * 0.02);
        }
        cv.fill(scale(skin, 0.32), 0.75);
        const point tip = g.nose_tip();
        cv.circle({tip.x + R * 0.02, tip.y - R * 0.03}, R * 0.035);
        cv.fill(rgb(255, 255, 255), 0.22);
    }
    // Mouth.
    {
        const color lips = to_color(t.lips);
        std::vector<point> outer;
        constexpr int n = 20;
        for (int i = 0; i <= n; ++i) {
            const double s = -1.0 + 2.0 * i / n;
            outer.push_back(g.mouth_point(s, g.outer_upper_y(s)));
        }
        for (int i = n - 1; i >= 1; --i) {
            const double s = -1.0 + 2.0 * i / n;
            outer.push_back(g.mouth_point(s, g.outer_lower_y(s)));
        }
        cv.polygon(outer);
        cv.fill(lips);
        if (x.mouth_open > 0.0) {
            std::vector<point> inner;
            for (int i = 0; i <= n; ++i) {
                const double s = -0.92 + 1.84 * i / n;
                inner.push_back(g.mouth_point(s, g.inner_upper_y(s)));
            }
            for (int i = n; i >= 0; --i) {
                const double s = -0.92 + 1.84 * i / n;
                inner.push_back(g.mouth_point(s, g.inner_lower_y(s)));
            }
            cv.polygon(inner);
            cv.fill(rgb(90, 28, 36));
            if (x.teeth) {
                cv.polygon(inner);
                cv.clip_to_mask();
                std::vector<point> teeth;
                for (int i = 0; i <= n; ++i) {
                    const double s = -1.0 + 2.0 * i / n;
                    teeth.push_back(g.mouth_point(s, g.inner_upper_y(s) - 0.02));
                }
                for (int i = n; i >= 0; --i) {
                    const double s = -1.0 + 2.0 * i / n;
                    const double y = x.teeth == 2 ? g.inner_lower_y(s) + 0.02 : lerp(g.inner_upper_y(s), g.inner_lower_y(s), 0.45);
                    teeth.push_back(g.mouth_point(s, y));
                }
                cv.polygon(teeth);
                cv.fill(rgb(240, 238, 230));
                cv.clear_clip();
            }
        }
        std::vector<point> line;
        for (int i = 0; i <= n; ++i) {
            const double s = -1.0 + 2.0 * i / n;
            line.push_back(g.mouth_point(s, x.mouth_open > 0.0 ? g.inner_upper_y(s) : g.mouth_center(s)));
        }
        cv.stroke(line, R * 0.034);
        cv.fill(scale(lips, 0.4), 0.85);
        if (t.beard == beard_style::moustache || t.beard == beard_style::goatee) {
            auto p = mouth_outer(0.005);
            const double w = g.mouth_half_width();
            p.push_back(g.mouth_point(1.05, g.mouth_center(1.0) + 0.02));
            p.push_back(g.on_face(w * 0.7, g.nose_y() + 0.05, 0.03));
            p.push_back(g.on_face(0.0, g.nose_y() + 0.07, 0.05));
            p.push_back(g.on_face(-w * 0.7, g.nose_y() + 0.05, 0.03));
            p.push_back(g.mouth_point(-1.05, g.mouth_center(-1.0) + 0.02));
            std::reverse(p.begin(), p.end());
            cv.polygon(p);
            if (t.beard == beard_style::goatee) {
                std::vector<point> q;
                for (int i = 0; i <= 10; ++i) {
                    const double s = -0.6 + 1.2 * i / 10.0;
                    q.push_back(g.mouth_point(s, g.outer_lower_y(s) + 0.015));
                }
                for (int i = 0; i <= 10; ++i) q.push_back(i <= 5 ? g.contour(1, 0.82 + 0.18 * i / 5.0) : g.contour(-1, 1.0 - 0.18 * (i - 5) / 5.0));
                cv.polygon(q);
            }
            cv.fill(scale(hair, 0.9), 0.95);
        }
    }
    // Eyes.
    for (int side = -1; side <= 1; side += 2) {
        const auto outline = g.eye_outline(side);
        cv.polygon(outline);
        cv.fill(rgb(242, 238, 232));
        cv.polygon(outline);
        cv.clip_to_mask();
        cv.polygon(g.eye_ring(side, g.iris_radius(), g.iris_radius()));
        cv.fill(to_color(t.eyes));
        cv.polygon(g.eye_ring(side, g.iris_radius() * 0.5, g.iris_radius() * 0.5));
        cv.fill(rgb(12, 10, 10));
        const point p = g.pupil(side);
        cv.circle({p.x + R * 0.025, p.y - R * 0.025}, R * 0.02);
        cv.fill(rgb(255, 255, 255), 0.85);
        cv.clear_clip();
        std::vector<point> upper;
        for (int i = 0; i <= 12; ++i) upper.push_back(g.lid(side, -1.0 + 2.0 * i / 12.0, true));
        cv.stroke(upper, R * 0.04, R * 0.04);
        cv.fill(dark_line);
        std::vector<point> lower;
        for (int i = 0; i <= 8; ++i) lower.push_back(g.lid(side, -0.9 + 1.8 * i / 8.0, false));
        cv.stroke(lower, R * 0.018);
        cv.fill(shadow, 0.5);
    }
    // Brows.
    for (int side = -1; side <= 1; side += 2) cv.polygon(g.brow_outline(side));
    cv.fill(mix(scale(hair, 0.75), rgb(40, 30, 25), t.hair_color.r > 180 ? 0.4 : 0.15));
    // Hair in front.
    if (t.hair != hair_style::bald) {
        double y_mid = g.eye_y() - 0.62 - 0.12 * t.hairline, y_side = g.eye_y() - 0.12;
        bool jagged = false;
        if (t.hair == hair_style::fringe) y_mid = g.eye_y() - 0.3, y_side = g.eye_y() - 0.1, jagged = true;
        if (t.hair == hair_style::long_hair) y_mid = g.eye_y() - 0.6 - 0.06 * t.hairline, y_side = g.eye_y() + 0.05;
        if (t.hair == hair_style::curly) y_mid = g.eye_y() - 0.56, y_side = g.eye_y() - 0.05;
        if (t.hair == hair_style::bob) y_mid = g.eye_y() - 0.36, y_side = g.eye_y() + 0.1;
        if (t.hair == hair_style::bun) y_mid = g.eye_y() - 0.68, y_side = g.eye_y() - 0.1;
        std::vector<point> cap;
        constexpr int n = 24;
        for (int i = 0; i <= n; ++i) {
            const double u = -1.0 + 2.0 * i / n;
            const double q = std::max(0.0, 1.0 - u * u);
            double y = t.hair == hair_style::fringe || t.hair == hair_style::bob ? lerp(y_side, y_mid, std::sqrt(std::sqrt(q)))
                                                                                  : lerp(y_side, y_mid, std::sqrt(q));
            y += 0.07 * t.hair_part * u * (t.hair == hair_style::bob ? 2.0 : 1.0);
            if (t.hair == hair_style::long_hair) y -= 0.08 * std::max(0.0, 1.0 - std::abs(u - 0.4 * t.hair_part) * 5.0);
            if (jagged && i % 2) y -= 0.05;
            cap.push_back(g.on_face(u * g.face_width() * 1.0, y, 0.02));
        }
        // Round the back of the head the hair reaches lower: the side the nose turns away from.
        const double back = 0.8 * std::abs(g.sin_yaw());
        const double a_right = 0.3 + (g.sin_yaw() < 0.0 ? back : 0.0), a_left = -pi - 0.3 - (g.sin_yaw() > 0.0 ? back : 0.0);
        for (int i = 0; i <= 24; ++i) cap.push_back(g.skull_point(lerp(a_right, a_left, i / 24.0), vol));
        cv.polygon(cap);
        if (t.hair == hair_style::curly) {
            for (int i = 0; i <= 18; ++i) cv.circle(g.skull_point(0.35 - (pi + 0.7) * i / 18.0, vol), R * 0.17);
            for (int i = 1; i < n; i += 3) cv.circle(cap[static_cast<std::size_t>(i)], R * 0.09);
        }
        const bool hatted = f.accessories == accessories::hat || f.accessories == accessories::both;
        if (t.hair == hair_style::bun && !hatted) cv.circle(g.skull_point(-pi / 2, vol + 0.05), R * 0.33);
        if (t.hair == hair_style::long_hair || t.hair == hair_style::bob) {
            // Locks framing the face, in front of the cheeks.
            const double bottom = t.hair == hair_style::long_hair ? g.chin_y() + 0.2 : g.chin_y() - 0.3;
            for (int side = -1; side <= 1; side += 2) {
                std::vector<point> lock;
                for (int i = 0; i <= 10; ++i) {
                    const double y = lerp(y_side - 0.1, bottom, i / 10.0);
                    lock.push_back(g.on_face(side * g.face_width() * (0.9 - 0.05 * i / 10.0), y, 0.02));
                }
                const point top = g.skull_point(side > 0 ? 0.0 : -pi, vol + 0.02);
                lock.push_back({sc.x + side * hw * (vol + 0.06), lock.back().y});
                lock.push_back(top);
                cv.polygon(lock);
            }
        }
        const color base = hair;
        cv.fill_with([&](double px, double py) {
            const double v = (py - sc.y) / hh, u = (px - sc.x) / hw;
            return scale(base, 1.0 + 0.12 * std::max(0.0, -v - 0.4) - 0.06 * u - 0.05 * std::max(0.0, v));
        });
    }
    // Glasses.
    if (f.accessories == accessories::glasses || f.accessories == accessories::both) {
        const double rx = g.eye_half_width() * 1.4, ry = std::max(0.14, 0.082 * t.eye_size * 1.9);
        const color frame = to_color(f.glasses);
        for (int side = -1; side <= 1; side += 2) cv.polygon(g.eye_ring(side, rx, ry, 0.01));
        cv.fill(rgb(220, 235, 245), 0.18);
        for (int side = -1; side <= 1; side += 2) {
            auto ring = g.eye_ring(side, rx, ry, 0.01);
            ring.push_back(ring.front());
            cv.stroke(ring, R * 0.035);
            if (g.facing(side, 0.0, 0.0) > -0.1) {
                const point a = g.on_face(g.eye_x(side) + side * rx, g.eye_y() + 0.01);
                const point b = g.project3(side * g.face_width() * 0.98, g.eye_y() + 0.08, -0.05);
                cv.stroke({a, b}, R * 0.03);
            }
        }
        std::vector<point> bridge;
        for (int i = 0; i <= 6; ++i) {
            const double u = -1.0 + 2.0 * i / 6.0;
            bridge.push_back(g.on_face(u * (g.eye_x(1) - rx), g.eye_y() - 0.02 - 0.03 * (1.0 - u * u), 0.06));
        }
        cv.stroke(bridge, R * 0.03);
        cv.fill(frame);
    }
    // Hat.
    if (f.accessories == accessories::hat || f.accessories == accessories::both) {
        const color hat = to_color(f.hat);
        const point brim = g.on_face(0.0, g.top_y() + 0.3, 0.05);
        const double top = sc.y - hh * (vol + 0.08);
        const double cx = lerp(sc.x, brim.x, 0.35);
        if (f.hat_style == 0) {
            std::vector<point> crown;
            for (int i = 0; i <= 12; ++i) {
                const double b = -pi * i / 12.0;
                crown.push_back({cx + hw * 0.86 * cosine(b), top + R * 0.25 + R * 0.25 * sine(b)});
            }
            crown.push_back({cx - hw * 0.9, brim.y});
            crown.push_back({cx + hw * 0.9, brim.y});
            std::reverse(crown.begin(), crown.end());
            cv.polygon(crown);
            cv.fill_with([&](double px, double) { return scale(hat, 1.0 - 0.15 * (px - cx) / hw); });
            cv.rect(cx - hw * 0.88, brim.y - R * 0.2, cx + hw * 0.88, brim.y - R * 0.04);
            cv.fill(scale(hat, 0.55));
            cv.ellipse({brim.x, brim.y}, hw * 1.5, R * (0.1 + 0.35 * std::abs(g.sin_pitch())));
            cv.fill(scale(hat, 0.9));
        } else {
            std::vector<point> dome;
            for (int i = 0; i <= 24; ++i) dome.push_back(g.skull_point(-pi * i / 24.0, vol + 0.06));
            dome.push_back({sc.x - hw * (vol + 0.06), brim.y});
            dome.push_back({sc.x + hw * (vol + 0.06), brim.y});
            std::reverse(dome.begin(), dome.end());
            cv.polygon(dome);
            cv.fill_with([&](double px, double) { return scale(hat, 1.0 - 0.12 * (px - sc.x) / hw); });
            cv.polygon(dome);
            cv.clip_to_mask();
            cv.rect(sc.x - hw * 2.0, brim.y - R * 0.24, sc.x + hw * 2.0, brim.y + R);
            cv.fill(scale(hat, 0.8));
            cv.clear_clip();
            cv.circle(g.skull_point(-pi / 2, vol + 0.22), R * 0.16);
            cv.fill(mix(hat, rgb(250, 250, 250), 0.6));
        }
    }
}

}  // namespace detail

// ---------------------------------------------------------------------------
// Rendering, scenes, captions, manifests

namespace detail {
inline void check_spec(const face_spec& f) {
    const auto& m = f.motion;
    check(std::isfinite(m.yaw_degrees) && std::abs(m.yaw_degrees) <= 60.0, world_component, "yaw ", m.yaw_degrees,
          " is outside -60..60 degrees");
    check(std::isfinite(m.pitch_degrees) && std::abs(m.pitch_degrees) <= 40.0, world_component, "pitch ", m.pitch_degrees,
          " is outside -40..40 degrees");
    check(std::isfinite(f.scale) && f.scale >= 0.05 && f.scale <= 1.0, world_component, "face scale ", f.scale, " is outside 0.05..1");
    check(std::isfinite(f.center_x) && std::isfinite(f.center_y) && f.center_x >= 0.0 && f.center_x <= 1.0 && f.center_y >= 0.0 &&
              f.center_y <= 1.0,
          world_component, "face centre (", f.center_x, ", ", f.center_y, ") is outside the image");
    check(static_cast<int>(m.expression) < 5 && static_cast<int>(f.accessories) < 4 && static_cast<int>(f.traits.hair) < 7 &&
              static_cast<int>(f.traits.beard) < 5,
          world_component, "a label of the face is out of range");
}
}  // namespace detail

/// value_error "[world] image size WxH is outside 16..2048 pixels per side" unless both sides fit.
inline void check_image_size(int width, int height) {
    check(width >= min_image_side && width <= max_image_side && height >= min_image_side && height <= max_image_side, world_component,
          "image size ", width, "x", height, " is outside ", min_image_side, "..", max_image_side, " pixels per side");
}

/// Draws `s` at width x height pixels. value_error "[world] ..." for a size
/// outside 16..2048, angles outside yaw -60..60 / pitch -40..40, a scale
/// outside 0.05..1, a centre outside the image or more than 8 faces.
inline rendering render(const scene& s, int width, int height) {
    check_image_size(width, height);
    check(s.faces.size() <= 8, world_component, "a scene holds at most 8 faces, got ", s.faces.size());
    check(static_cast<int>(s.background) < 6, world_component, "background label out of range");
    for (const auto& f : s.faces) detail::check_spec(f);
    const int side = std::min(width, height);
    const int samples = side <= 160 ? 3 : 2;
    detail::canvas cv(width, height, samples);
    detail::draw_background(cv, s.background, s.background_seed);
    rendering out;
    out.width = width;
    out.height = height;
    for (const auto& f : s.faces) {
        detail::draw_face(cv, detail::face_geometry(f, width, height));
        out.faces.push_back(face_ground_truth(f, width, height));
    }
    out.rgb = cv.resolve();
    return out;
}

/// A random single-person scene of identity `id`: picture number `sample` of that identity under `seed`.
inline scene sample_scene(std::uint64_t id, std::uint64_t sample, std::uint64_t seed) {
    detail::random_stream r(detail::splitmix(detail::splitmix(seed ^ 0x510e527fade682d1ull) ^ detail::splitmix(id) ^ (sample * 0x9e3779b97f4a7c15ull)));
    face_spec f;
    f.traits = identity(id);
    f.motion.expression = static_cast<expression>(r.below(5));
    f.motion.yaw_degrees = yaw_of(static_cast<yaw_label>(r.below(3))) + r.range(-6.0, 6.0);
    const int p = r.below(10);
    f.motion.pitch_degrees = pitch_of(p < 6 ? pitch_label::front : (p < 8 ? pitch_label::up : pitch_label::down)) + r.range(-4.0, 4.0);
    const int a = r.below(100);
    f.accessories = a < 50 ? accessories::none : a < 68 ? accessories::hat : a < 88 ? accessories::glasses : accessories::both;
    f.hat = detail::to_rgb8({r.range(30, 230), r.range(30, 230), r.range(30, 230)});
    f.hat_style = r.below(2);
    static constexpr std::array<std::array<double, 3>, 4> frames{{{20, 20, 24}, {90, 60, 40}, {180, 150, 80}, {120, 30, 40}}};
    const auto& fr = frames[static_cast<std::size_t>(r.below(4))];
    f.glasses = detail::to_rgb8({fr[0], fr[1], fr[2]});
    f.center_x = r.range(0.42, 0.58);
    f.center_y = r.range(0.40, 0.48);
    f.scale = r.range(0.36, 0.48);
    scene s;
    s.background = static_cast<background_kind>(r.below(6));
    s.background_seed = detail::splitmix(static_cast<std::uint64_t>(r.below(1 << 30)) ^ (sample << 32));
    s.faces.push_back(f);
    return s;
}

/// Two people side by side (evaluation scenes): identities `left` and `right`.
inline scene sample_two_person_scene(std::uint64_t left, std::uint64_t right, std::uint64_t sample, std::uint64_t seed) {
    scene a = sample_scene(left, sample, seed ^ 0x1f83d9abfb41bd6bull);
    const scene b = sample_scene(right, sample, seed ^ 0x5be0cd19137e2179ull);
    a.faces.push_back(b.faces[0]);
    detail::random_stream r(detail::splitmix(seed ^ left * 31 ^ right * 1009 ^ sample));
    for (std::size_t i = 0; i < 2; ++i) {
        auto& f = a.faces[i];
        f.center_x = (i == 0 ? 0.28 : 0.72) + r.range(-0.03, 0.03);
        f.center_y = r.range(0.38, 0.46);
        f.scale = r.range(0.26, 0.32);
    }
    return a;
}

/// The world's expression in face_prompt.hpp's enum.
inline modules::imr::expression to_imr(expression e) {
    switch (e) {
        case expression::happy: return modules::imr::expression::happy;
        case expression::sad: return modules::imr::expression::sad;
        case expression::surprised: return modules::imr::expression::surprised;
        case expression::angry: return modules::imr::expression::angry;
        case expression::neutral: break;
    }
    return modules::imr::expression::neutral;
}

/// The released automatic source prompt of a face, e.g. "in a happy expression, facing up, in side view".
inline std::string face_prompt_inference(const face_motion& m) {
    return modules::imr::inference_prompt(to_imr(m.expression), modules::imr::pose_from_angles(m.pitch_degrees, m.yaw_degrees));
}

/// The training captions' face prompt, e.g. "the expression is happy, the face is fully turned to the left".
/// |yaw| < 10: front view; < 25: slightly turned; otherwise fully; left for yaw < 0 (the viewer's left).
inline std::string face_prompt_training(const face_motion& m) {
    using modules::imr::head_turn;
    const double y = m.yaw_degrees;
    check(!std::isnan(y), world_component, "yaw must not be NaN");
    const head_turn turn = std::abs(y) < 10.0 ? head_turn::front
                         : y < 0.0            ? (y > -25.0 ? head_turn::slightly_left : head_turn::fully_left)
                                              : (y < 25.0 ? head_turn::slightly_right : head_turn::fully_right);
    return modules::imr::training_prompt(to_imr(m.expression), turn);
}

/// "on the beach", "in a forest", "against a plain blue background", ...
inline std::string background_words(background_kind b, std::uint64_t seed) {
    switch (b) {
        case background_kind::beach: return "on the beach";
        case background_kind::forest: return "in a forest";
        case background_kind::city: return "in the city";
        case background_kind::room: return "in a room";
        case background_kind::mountains: return "in the mountains";
        case background_kind::plain: break;
    }
    return "against a plain " + std::string(detail::plain_names[seed % detail::plain_names.size()]) + " background";
}

/// The scene's caption in the paper's wording:
/// "a person with a happy expression in side view, facing up, wearing a hat, on the beach"
/// or, for two faces, "two people on the beach".
inline std::string scene_caption(const scene& s) {
    const std::string where = background_words(s.background, s.background_seed);
    if (s.faces.size() != 1) return (s.faces.size() == 2 ? "two people " : std::to_string(s.faces.size()) + " people ") + where;
    const face_spec& f = s.faces[0];
    std::string c = "a person with a";
    const auto adj = name(f.motion.expression);
    c += adj == "angry" ? "n " : " ";
    c += adj;
    c += " expression in ";
    c += label_of_yaw(f.motion.yaw_degrees) == yaw_label::front ? "front view" : "side view";
    const auto p = label_of_pitch(f.motion.pitch_degrees);
    if (p != pitch_label::front) c += p == pitch_label::up ? ", facing up" : ", facing down";
    if (f.accessories == accessories::hat) c += ", wearing a hat";
    else if (f.accessories == accessories::glasses) c += ", wearing glasses";
    else if (f.accessories == accessories::both) c += ", wearing a hat and glasses";
    return c + ", " + where;
}

namespace detail {
inline void json_number(std::string& o, double v, int decimals = 2) {
    char buf[64];
    // Fixed notation without locale: integer part and rounded fraction by hand.
    const bool neg = v < 0;
    double a = neg ? -v : v;
    double scale = 1;
    for (int i = 0; i < decimals; ++i) scale *= 10;
    const auto q = static_cast<unsigned long long>(std::floor(a * scale + 0.5));
    const auto ip = q / static_cast<unsigned long long>(scale), fp = q % static_cast<unsigned long long>(scale);
    int n = std::snprintf(buf, sizeof buf, "%s%llu", neg && q ? "-" : "", ip);
    if (decimals > 0) n += std::snprintf(buf + n, sizeof buf - static_cast<std::size_t>(n), ".%0*llu", decimals, fp);
    o.append(buf, static_cast<std::size_t>(n));
}
inline void json_string(std::string& o, std::string_view s) {
    o += '"';
    for (char c : s) {
        if (c == '"' || c == '\\') o += '\\', o += c;
        else if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(static_cast<unsigned char>(c)));
            o += buf;
        } else o += c;
    }
    o += '"';
}
inline void json_key(std::string& o, std::string_view k) {
    if (o.back() != '{') o += ", ";
    json_string(o, k);
    o += ": ";
}
inline void json_points(std::string& o, std::span<const std::array<double, 2>> pts, double sx, double sy) {
    o += '[';
    for (std::size_t i = 0; i < pts.size(); ++i) {
        if (i) o += ", ";
        json_number(o, pts[i][0] * sx);
        o += ", ";
        json_number(o, pts[i][1] * sy);
    }
    o += ']';
}
inline void json_face(std::string& o, const face_spec& f, const face_truth& t) {
    json_key(o, "identity");
    o += std::to_string(f.traits.id);
    json_key(o, "expression");
    json_string(o, name(f.motion.expression));
    json_key(o, "yaw");
    json_number(o, t.yaw_degrees);
    json_key(o, "pitch");
    json_number(o, t.pitch_degrees);
    json_key(o, "yaw_label");
    json_string(o, name(label_of_yaw(t.yaw_degrees)));
    json_key(o, "pitch_label");
    json_string(o, name(label_of_pitch(t.pitch_degrees)));
    json_key(o, "accessories");
    json_string(o, name(f.accessories));
    json_key(o, "box");
    o += '[';
    for (std::size_t i = 0; i < 4; ++i) {
        if (i) o += ", ";
        json_number(o, t.box[i]);
    }
    o += ']';
    json_key(o, "kps5");
    json_points(o, t.kps5, 1.0, 1.0);
    json_key(o, "landmarks106");
    json_points(o, t.landmarks, 1.0, 1.0);
    json_key(o, "face_prompt_inference");
    json_string(o, face_prompt_inference(f.motion));
    json_key(o, "face_prompt_training");
    json_string(o, face_prompt_training(f.motion));
    const auto& tr = f.traits;
    json_key(o, "traits");
    o += '{';
    const auto num = [&](std::string_view k, double v) {
        json_key(o, k);
        json_number(o, v, 3);
    };
    const auto col = [&](std::string_view k, rgb8 c) {
        json_key(o, k);
        o += "[" + std::to_string(c.r) + ", " + std::to_string(c.g) + ", " + std::to_string(c.b) + "]";
    };
    num("face_width", tr.face_width);
    num("face_height", tr.face_height);
    num("jaw_roundness", tr.jaw_roundness);
    num("skin_tone", tr.skin_tone);
    col("skin", tr.skin);
    col("hair_color", tr.hair_color);
    json_key(o, "hair");
    json_string(o, name(tr.hair));
    col("eyes", tr.eyes);
    num("eye_size", tr.eye_size);
    num("eye_spacing", tr.eye_spacing);
    num("nose_length", tr.nose_length);
    num("nose_width", tr.nose_width);
    num("brow_thickness", tr.brow_thickness);
    num("brow_angle", tr.brow_angle);
    num("mouth_width", tr.mouth_width);
    json_key(o, "beard");
    json_string(o, name(tr.beard));
    json_key(o, "freckles");
    o += tr.freckles ? "true" : "false";
    o += '}';
}
}  // namespace detail

namespace detail {
/// An RGB8 picture resized (bicubic) to side x side, as (3, side, side) floats (v - 127.5) / 127.5.
inline std::vector<float> planar_input(const modules::clip::image_u8& img, int side) {
    const auto resized = modules::clip::resize(img, side, side);
    std::vector<float> out;
    out.reserve(static_cast<std::size_t>(3 * side * side));
    for (int c = 0; c < 3; ++c)
        for (long k = 0; k < static_cast<long>(side) * side; ++k)
            out.push_back(static_cast<float>((resized.pixels[static_cast<std::size_t>(k * 3 + c)] - 127.5) / 127.5));
    return out;
}
}  // namespace detail

/// The identity encoder's input for face `face` of a rendering: its box made
/// square and 20% larger (clamped to the picture), resized (bicubic) to
/// side x side, as (3, side, side) floats (v - 127.5) / 127.5. The identity
/// encoder is trained and used on exactly these crops.
inline std::vector<float> face_crop(const rendering& r, std::size_t face, int side) {
    check(face < r.faces.size(), world_component, "face ", face, " of a rendering with ", r.faces.size());
    check(side >= 1 && side <= 4096, world_component, "crop side ", side, " out of range");
    const auto& box = r.faces[face].box;
    const double cx = (box[0] + box[2]) / 2, cy = (box[1] + box[3]) / 2;
    const double half = 0.6 * std::max(box[2] - box[0], box[3] - box[1]);
    const auto clamp_to = [](double v, long lo, long hi) { return std::clamp(std::lround(v), lo, hi); };
    const long x0 = clamp_to(cx - half, 0, r.width - 1), y0 = clamp_to(cy - half, 0, r.height - 1);
    const long x1 = clamp_to(cx + half, x0 + 1, r.width), y1 = clamp_to(cy + half, y0 + 1, r.height);
    modules::clip::image_u8 crop;
    crop.height = y1 - y0;
    crop.width = x1 - x0;
    crop.pixels.reserve(static_cast<std::size_t>(crop.height * crop.width * 3));
    for (long y = y0; y < y1; ++y)
        for (long x = x0; x < x1; ++x)
            for (int c = 0; c < 3; ++c) crop.pixels.push_back(r.rgb[static_cast<std::size_t>((y * r.width + x) * 3 + c)]);
    return detail::planar_input(crop, side);
}

/// A whole rendering resized (bicubic) to side x side, as (3, side, side)
/// floats (v - 127.5) / 127.5: the input of the scene classifiers (background).
inline std::vector<float> image_input(const rendering& r, int side) {
    check(side >= 1 && side <= 4096, world_component, "input side ", side, " out of range");
    modules::clip::image_u8 img;
    img.height = r.height;
    img.width = r.width;
    img.pixels = r.rgb;
    return detail::planar_input(img, side);
}

/// The attributes the evaluation's classifiers predict.
enum class attribute : std::uint8_t { expression, yaw, pitch, accessories, background };

inline attribute parse_attribute(std::string_view w) {
    constexpr std::array<std::string_view, 5> n{"expression", "yaw", "pitch", "accessories", "background"};
    for (std::size_t i = 0; i < n.size(); ++i)
        if (n[i] == w) return static_cast<attribute>(i);
    throw value_error(std::string(world_component), "unknown attribute '" + std::string(w) + "' (expression, yaw, pitch, accessories, background)");
}
inline std::string_view name(attribute a) {
    constexpr std::array<std::string_view, 5> n{"expression", "yaw", "pitch", "accessories", "background"};
    return n[static_cast<std::size_t>(a)];
}
/// Number of classes of an attribute (the enum's size).
inline int classes_of(attribute a) {
    constexpr std::array<int, 5> n{5, 3, 3, 4, 6};
    return n[static_cast<std::size_t>(a)];
}
/// The class of face `face` of a scene for an attribute (background: the scene's).
inline int label_of(const scene& s, std::size_t face, attribute a) {
    check(face < s.faces.size(), world_component, "face ", face, " of a scene with ", s.faces.size());
    const auto& f = s.faces[face];
    switch (a) {
        case attribute::expression: return static_cast<int>(f.motion.expression);
        case attribute::yaw: return static_cast<int>(label_of_yaw(f.motion.yaw_degrees));
        case attribute::pitch: return static_cast<int>(label_of_pitch(f.motion.pitch_degrees));
        case attribute::accessories: return static_cast<int>(f.accessories);
        case attribute::background: break;
    }
    return static_cast<int>(s.background);
}
/// The name of class `k` of an attribute ("happy", "left", "hat", "beach", ...).
inline std::string_view class_name(attribute a, int k) {
    check(k >= 0 && k < classes_of(a), world_component, "class ", k, " of ", name(a));
    switch (a) {
        case attribute::expression: return name(static_cast<expression>(k));
        case attribute::yaw: return name(static_cast<yaw_label>(k));
        case attribute::pitch: return name(static_cast<pitch_label>(k));
        case attribute::accessories: return name(static_cast<accessories>(k));
        case attribute::background: break;
    }
    return name(static_cast<background_kind>(k));
}

/// One JSON-lines manifest line for a rendered scene. Single-person lines
/// carry what training::read_manifest reads ("image", "text", "person",
/// "face_prompt" in the training wording, "landmarks" as 212 numbers on a
/// `landmark_frame` square frame, and "arcface" when given), plus the ground
/// truth: identity, expression, yaw, pitch, labels, box, kps5, landmarks106
/// (output pixels), background, accessories, both face prompts and traits.
/// Two-person lines hold the per-face truth in "faces".
inline std::string manifest_line(const scene& s, const rendering& r, std::string_view image, std::span<const float> arcface = {},
                                 double landmark_frame = 512.0) {
    check(s.faces.size() == r.faces.size(), world_component, "the rendering does not belong to the scene");
    std::string o = "{";
    detail::json_key(o, "image");
    detail::json_string(o, image);
    detail::json_key(o, "text");
    detail::json_string(o, scene_caption(s));
    detail::json_key(o, "width");
    o += std::to_string(r.width);
    detail::json_key(o, "height");
    o += std::to_string(r.height);
    detail::json_key(o, "background");
    detail::json_string(o, name(s.background));
    if (s.faces.size() == 1) {
        const auto& f = s.faces[0];
        detail::json_key(o, "person");
        detail::json_string(o, "world-" + std::to_string(f.traits.id));
        detail::json_key(o, "face_prompt");
        detail::json_string(o, face_prompt_training(f.motion));
        detail::json_key(o, "landmarks");
        detail::json_points(o, r.faces[0].landmarks, landmark_frame / r.width, landmark_frame / r.height);
        detail::json_face(o, f, r.faces[0]);
        if (!arcface.empty()) {
            detail::json_key(o, "arcface");
            o += '[';
            for (std::size_t i = 0; i < arcface.size(); ++i) {
                if (i) o += ", ";
                detail::json_number(o, arcface[i], 6);
            }
            o += ']';
        }
    } else {
        detail::json_key(o, "faces");
        o += '[';
        for (std::size_t i = 0; i < s.faces.size(); ++i) {
            if (i) o += ", ";
            o += '{';
            detail::json_face(o, s.faces[i], r.faces[i]);
            o += '}';
        }
        o += ']';
    }
    o += '}';
    return o;
}

/// Marks the 106 landmarks (red) and 5 keypoints (cyan) of every face on `r`, for inspection.
inline void draw_landmarks(rendering& r) {
    const auto dot = [&r](double x, double y, rgb8 c) {
        const auto ix = static_cast<int>(std::floor(x)), iy = static_cast<int>(std::floor(y));
        if (ix < 0 || iy < 0 || ix >= r.width || iy >= r.height) return;
        auto* p = r.rgb.data() + (static_cast<std::size_t>(iy) * static_cast<std::size_t>(r.width) + static_cast<std::size_t>(ix)) * 3;
        p[0] = c.r, p[1] = c.g, p[2] = c.b;
    };
    for (const auto& f : r.faces) {
        for (const auto& p : f.landmarks) dot(p[0], p[1], {255, 0, 0});
        for (const auto& p : f.kps5) dot(p[0], p[1], {0, 255, 255});
    }
}

}  // namespace dynamicid::world
