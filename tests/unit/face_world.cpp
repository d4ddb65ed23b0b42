// The procedural face world (examples/world/face_world.hpp): determinism,
// identities, ground truth against the drawn pixels, motion, captions,
// manifests and errors.
#include <face_world.hpp>

#include <dynamicid/training/dataset.hpp>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <limits>
#include <set>
#include <string>
#include <tuple>
#include <vector>

using namespace dynamicid::world;

namespace {

std::uint64_t fnv1a(const std::vector<std::uint8_t>& bytes) {
    std::uint64_t h = 0xcbf29ce484222325ull;
    for (auto b : bytes) h = (h ^ b) * 0x100000001b3ull;
    return h;
}

/// A plain, front-facing, accessory-free portrait of `id` (the controlled setting of most checks).
scene portrait(std::uint64_t id, expression e = expression::neutral, double yaw = 0.0, double pitch = 0.0) {
    scene s = sample_scene(id, 0, 1);
    s.background = background_kind::plain;
    s.background_seed = 2;
    auto& f = s.faces[0];
    f.motion = {e, yaw, pitch};
    f.accessories = accessories::none;
    f.center_x = 0.5;
    f.center_y = 0.45;
    f.scale = 0.45;
    return s;
}

double luminance(const rendering& r, double x, double y) {
    const int ix = std::clamp(static_cast<int>(std::floor(x)), 0, r.width - 1), iy = std::clamp(static_cast<int>(std::floor(y)), 0, r.height - 1);
    const auto* p = r.rgb.data() + (static_cast<std::size_t>(iy) * static_cast<std::size_t>(r.width) + static_cast<std::size_t>(ix)) * 3;
    return 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
}

double darkest_near(const rendering& r, double x, double y, int radius = 1) {
    double m = 1e9;
    for (int dy = -radius; dy <= radius; ++dy)
        for (int dx = -radius; dx <= radius; ++dx) m = std::min(m, luminance(r, x + dx, y + dy));
    return m;
}

double lum(rgb8 c) { return 0.299 * c.r + 0.587 * c.g + 0.114 * c.b; }

std::array<double, 2> at(const face_truth& t, int i) { return t.landmarks[static_cast<std::size_t>(i)]; }

}  // namespace

TEST_CASE("world pixels are the same on every run", "[world]") {
    const scene s = sample_scene(7, 3, 11);
    const auto a = render(s, 64, 64);
    const auto b = render(sample_scene(7, 3, 11), 64, 64);
    REQUIRE(a.rgb.size() == 64u * 64u * 3u);
    CHECK(a.rgb == b.rgb);
    // A fixed id, sample and seed always give these pixels (integer RNG, own sine, IEEE arithmetic).
    CHECK(fnv1a(a.rgb) == 0x37cde84a1d7f48f2ull);
    CHECK(identity(7).skin == identity(7).skin);
    CHECK(identity(7).eye_spacing == identity(7).eye_spacing);
}

TEST_CASE("world identities are distinct", "[world]") {
    std::set<std::tuple<int, int, int, int, int>> looks;
    std::set<std::uint64_t> pictures;
    for (std::uint64_t id = 0; id < 300; ++id) {
        const auto t = identity(id);
        looks.insert({static_cast<int>(t.hair), t.hair_color.r / 24, t.skin.r / 12, static_cast<int>(t.beard), static_cast<int>(t.eye_size * 10)});
        if (id < 60) pictures.insert(fnv1a(render(portrait(id), 64, 64).rgb));
    }
    CHECK(looks.size() >= 280);   // almost every identity differs in a coarse, visible trait combination
    CHECK(pictures.size() == 60);  // same motion and context, different people, different pixels
    // Two identities in the same pose differ on many pixels, not just a few.
    const auto a = render(portrait(1), 64, 64), b = render(portrait(2), 64, 64);
    double diff = 0;
    for (std::size_t i = 0; i < a.rgb.size(); ++i) diff += std::abs(int(a.rgb[i]) - int(b.rgb[i]));
    CHECK(diff / static_cast<double>(a.rgb.size()) > 8.0);
}

TEST_CASE("world landmarks sit inside the box and on the drawn features", "[world]") {
    for (std::uint64_t id = 0; id < 24; ++id) {
        const scene s = sample_scene(id, id % 5, 3);  // any pose, background and accessories
        const auto r = render(s, 128, 128);
        REQUIRE(r.faces.size() == 1);
        const auto& t = r.faces[0];
        const auto& b = t.box;
        CHECK(b[0] >= 0.0);
        CHECK(b[2] <= 128.0);
        CHECK(b[2] - b[0] > 20.0);
        CHECK(b[3] - b[1] > 30.0);
        for (const auto& p : t.landmarks) {
            CHECK(p[0] >= b[0] - 1e-9);
            CHECK(p[0] <= b[2] + 1e-9);
            CHECK(p[1] >= b[1] - 1e-9);
            CHECK(p[1] <= b[3] + 1e-9);
        }
        // The 5 keypoints are the matching landmarks.
        CHECK(t.kps5[0] == at(t, 38));
        CHECK(t.kps5[1] == at(t, 92));
        CHECK(t.kps5[2] == at(t, 86));
        CHECK(t.kps5[3] == at(t, 52));
        CHECK(t.kps5[4] == at(t, 61));
        CHECK(t.kps5[0][0] < t.kps5[1][0]);
        CHECK(t.kps5[3][0] < t.kps5[4][0]);
    }
    // Pupils are dark, in every skin tone; the mouth line is darker than the skin.
    for (std::uint64_t id = 0; id < 40; ++id) {
        const scene s = portrait(id);
        const auto r = render(s, 128, 128);
        const auto& t = r.faces[0];
        const double skin = lum(s.faces[0].traits.skin);
        INFO("identity " << id << " skin luminance " << skin);
        CHECK(darkest_near(r, t.kps5[0][0], t.kps5[0][1]) < std::min(80.0, 0.6 * skin));
        CHECK(darkest_near(r, t.kps5[1][0], t.kps5[1][1]) < std::min(80.0, 0.6 * skin));
        const auto mid = at(t, 62);  // inner upper lip, on the drawn lip line
        CHECK(darkest_near(r, mid[0], mid[1]) < 0.85 * skin);
        // The forehead between the brows is skin (no glasses, no hat here), brighter than the pupils.
        const auto l = at(t, 50), rr = at(t, 102);
        CHECK(luminance(r, 0.5 * (l[0] + rr[0]), 0.5 * (l[1] + rr[1]) + 2.0) > darkest_near(r, t.kps5[0][0], t.kps5[0][1]) + 15.0);
    }
}

TEST_CASE("world ground truth scales with the image size", "[world]") {
    const scene s = sample_scene(5, 1, 9);
    const auto a = render(s, 64, 64), b = render(s, 256, 256);
    for (std::size_t i = 0; i < 106; ++i) {
        CHECK(b.faces[0].landmarks[i][0] == Approx(4.0 * a.faces[0].landmarks[i][0]).epsilon(1e-9));
        CHECK(b.faces[0].landmarks[i][1] == Approx(4.0 * a.faces[0].landmarks[i][1]).epsilon(1e-9));
    }
    CHECK(face_ground_truth(s.faces[0], 64, 64).box == a.faces[0].box);
    const auto c = render(s, 96, 48);  // non-square canvases work too
    CHECK(c.rgb.size() == 96u * 48u * 3u);
}

TEST_CASE("world expressions move the mouth and brows", "[world]") {
    const auto truth = [](expression e) { return render(portrait(12, e), 128, 128).faces[0]; };
    const auto n = truth(expression::neutral), h = truth(expression::happy), s = truth(expression::sad);
    const auto su = truth(expression::surprised), a = truth(expression::angry);
    // Corners relative to the lip centre: up when happy, down when sad (y grows downwards).
    const auto lift = [](const face_truth& t) { return 0.5 * (at(t, 52)[1] + at(t, 61)[1]) - 0.5 * (at(t, 71)[1] + at(t, 53)[1]); };
    CHECK(lift(h) < lift(n) - 2.0);
    CHECK(lift(s) > lift(n) + 2.0);
    // Open mouth: the inner lips part.
    const auto gap = [](const face_truth& t) { return at(t, 60)[1] - at(t, 62)[1]; };
    CHECK(gap(n) == Approx(0.0).margin(1e-9));
    CHECK(gap(su) > 4.0);
    CHECK(gap(h) > 1.5);
    // Surprised raises the brows, angry lowers their inner ends, surprised opens the eyes.
    CHECK(at(su, 49)[1] < at(n, 49)[1] - 1.5);
    CHECK(at(a, 50)[1] > at(n, 50)[1] + 1.5);
    CHECK(at(su, 33)[1] - at(su, 40)[1] > at(n, 33)[1] - at(n, 40)[1] + 1.0);
    // And the pixels change where the mouth is.
    CHECK(render(portrait(12, expression::happy), 64, 64).rgb != render(portrait(12), 64, 64).rgb);
}

TEST_CASE("world head pose moves the nose and narrows the far side", "[world]") {
    const auto truth = [](double yaw, double pitch) { return render(portrait(4, expression::neutral, yaw, pitch), 128, 128).faces[0]; };
    const auto l = truth(-35, 0), f = truth(0, 0), r = truth(35, 0);
    // The nose tip moves left / right, further than the face centre does.
    CHECK(at(l, 86)[0] < at(f, 86)[0] - 5.0);
    CHECK(at(r, 86)[0] > at(f, 86)[0] + 5.0);
    const auto rel = [](const face_truth& t) { return (at(t, 86)[0] - t.box[0]) / (t.box[2] - t.box[0]); };
    CHECK(rel(l) < rel(f) - 0.1);
    CHECK(rel(r) > rel(f) + 0.1);
    // Foreshortening: the face narrows and the far eye (the one the nose turns towards) gets smaller.
    CHECK(r.box[2] - r.box[0] < 0.95 * (f.box[2] - f.box[0]));
    const auto width = [](const face_truth& t, int o) { return at(t, 39 + o)[0] - at(t, 35 + o)[0]; };
    CHECK(width(r, 54) < 0.85 * width(r, 0));
    CHECK(width(l, 0) < 0.85 * width(l, 54));
    CHECK(width(f, 0) == Approx(width(f, 54)).epsilon(1e-9));
    // Pitch: the protruding nose tip rises towards the eyes when facing up and drops away when facing down.
    const auto u = truth(0, 20), d = truth(0, -20);
    const auto eye_to_nose = [](const face_truth& t) { return at(t, 86)[1] - 0.5 * (at(t, 38)[1] + at(t, 92)[1]); };
    CHECK(eye_to_nose(u) < eye_to_nose(f) - 2.0);
    CHECK(eye_to_nose(d) > eye_to_nose(f) + 2.0);
    CHECK(at(u, 38)[1] < at(f, 38)[1] - 3.0);
    CHECK(label_of_yaw(-35) == yaw_label::left);
    CHECK(label_of_yaw(9.9) == yaw_label::front);
    CHECK(label_of_yaw(10) == yaw_label::right);
    CHECK(label_of_pitch(20) == pitch_label::up);
    CHECK(label_of_pitch(10) == pitch_label::front);
    CHECK(label_of_pitch(-20) == pitch_label::down);
}

TEST_CASE("world captions and face prompts use the paper's wording", "[world]") {
    scene s = portrait(3, expression::happy, 35.0, 0.0);
    s.background = background_kind::beach;
    s.faces[0].accessories = accessories::hat;
    CHECK(scene_caption(s) == "a person with a happy expression in side view, wearing a hat, on the beach");
    s.faces[0].motion = {expression::angry, 0.0, 20.0};
    s.faces[0].accessories = accessories::both;
    s.background = background_kind::forest;
    CHECK(scene_caption(s) == "a person with an angry expression in front view, facing up, wearing a hat and glasses, in a forest");
    s.background = background_kind::plain;
    s.background_seed = 0;
    s.faces[0].accessories = accessories::none;
    CHECK(scene_caption(s) == "a person with an angry expression in front view, facing up, against a plain blue background");
    CHECK(face_prompt_inference({expression::happy, -35.0, 0.0}) == "in a happy expression, in side view");
    CHECK(face_prompt_inference({expression::surprised, 0.0, 20.0}) == "in a surprise expression, facing up, in front view");
    CHECK(face_prompt_training({expression::happy, -35.0, 0.0}) == "the expression is happy, the face is fully turned to the left");
    CHECK(face_prompt_training({expression::sad, 15.0, 0.0}) == "the expression is sad, the face is slightly turned to the right");
    CHECK(face_prompt_training({expression::neutral, 0.0, -20.0}) == "the expression is neutral, the face is front view");
    const scene two = sample_two_person_scene(1, 2, 0, 5);
    REQUIRE(two.faces.size() == 2);
    CHECK(scene_caption(two).rfind("two people ", 0) == 0);
}

TEST_CASE("world two-person scenes give one box per face", "[world]") {
    for (std::uint64_t m = 0; m < 6; ++m) {
        const scene s = sample_two_person_scene(10 + m, 20 + m, m, 4);
        const auto r = render(s, 128, 128);
        REQUIRE(r.faces.size() == 2);
        const auto& a = r.faces[0].box;
        const auto& b = r.faces[1].box;
        CHECK(a[2] < b[0]);  // side by side, left face first
        CHECK(a[0] >= 0.0);
        CHECK(b[2] <= 128.0);
        CHECK(s.faces[0].traits.id == 10 + m);
        CHECK(s.faces[1].traits.id == 20 + m);
    }
}

TEST_CASE("world manifest lines parse as training manifests", "[world]") {
    const scene s = sample_scene(21, 2, 8);
    const auto r = render(s, 64, 64);
    const std::vector<float> arcface{0.5f, -0.25f, 0.125f};
    const std::string line = manifest_line(s, r, "images/21_2.png", arcface);
    const auto j = nlohmann::json::parse(line);
    CHECK(j["image"] == "images/21_2.png");
    CHECK(j["text"] == scene_caption(s));
    CHECK(j["identity"] == 21);
    CHECK(j["person"] == "world-21");
    CHECK(j["expression"] == std::string(name(s.faces[0].motion.expression)));
    CHECK(j["yaw_label"] == std::string(name(label_of_yaw(s.faces[0].motion.yaw_degrees))));
    CHECK(j["box"].size() == 4);
    CHECK(j["kps5"].size() == 10);
    CHECK(j["landmarks106"].size() == 212);
    CHECK(j["landmarks106"][0].get<double>() == Approx(r.faces[0].landmarks[0][0]).margin(0.006));
    CHECK(j["landmarks"][1].get<double>() == Approx(r.faces[0].landmarks[0][1] * 8.0).margin(0.006));  // 512 frame
    CHECK(j["face_prompt_training"] == face_prompt_training(s.faces[0].motion));
    CHECK(j["face_prompt_inference"] == face_prompt_inference(s.faces[0].motion));
    CHECK(j["background"] == std::string(name(s.background)));
    CHECK(j["traits"]["hair"] == std::string(name(s.faces[0].traits.hair)));

    const auto dir = std::filesystem::temp_directory_path() / "dynamicid_world_manifest_test";
    std::filesystem::create_directories(dir);
    {
        std::ofstream out(dir / "train.jsonl");
        out << line << '\n';
    }
    dynamicid::training::manifest_limits limits;
    limits.arcface_width = 0;
    const auto samples = dynamicid::training::read_manifest(dir / "train.jsonl", limits);
    REQUIRE(samples.size() == 1);
    CHECK(samples[0].image == dir / "images/21_2.png");
    CHECK(samples[0].text == scene_caption(s));
    CHECK(samples[0].person == "world-21");
    CHECK(samples[0].face_prompt == face_prompt_training(s.faces[0].motion));
    CHECK(samples[0].landmarks.size() == 212);
    CHECK(samples[0].arcface == arcface);
    std::filesystem::remove_all(dir);

    const scene two = sample_two_person_scene(1, 2, 0, 5);
    const auto j2 = nlohmann::json::parse(manifest_line(two, render(two, 64, 64), "two/0.png"));
    REQUIRE(j2["faces"].size() == 2);
    CHECK(j2["faces"][1]["identity"] == 2);
    CHECK(j2["text"] == scene_caption(two));
    CHECK_FALSE(j2.contains("person"));  // evaluation scenes stay out of the person-grouped stage
}

TEST_CASE("world rejects bad sizes, labels and angles with world errors", "[world]") {
    const scene s = sample_scene(1, 0, 0);
    const auto throws_world = [](auto&& f, const std::string& text) {
        try {
            f();
            FAIL("no exception");
        } catch (const dynamicid::value_error& e) {
            const std::string what = e.what();
            CHECK(what.rfind("[world] ", 0) == 0);
            CHECK(what.find(text) != std::string::npos);
        }
    };
    throws_world([&] { render(s, 0, 64); }, "image size 0x64 is outside 16..2048");
    throws_world([&] { render(s, 64, 100000); }, "image size 64x100000");
    throws_world([&] { render(s, -5, -5); }, "image size");
    throws_world([] { parse_expression("grumpy"); }, "unknown expression 'grumpy' (known: neutral, happy, sad, surprised, angry)");
    throws_world([] { parse_yaw("sideways"); }, "unknown yaw 'sideways'");
    throws_world([] { parse_pitch("Up"); }, "unknown pitch 'Up'");
    throws_world([] { parse_background("moon"); }, "unknown background 'moon'");
    throws_world([] { parse_accessories("scarf"); }, "unknown accessories 'scarf'");
    scene bad = s;
    bad.faces[0].motion.yaw_degrees = 90.0;
    throws_world([&] { render(bad, 64, 64); }, "yaw 90 is outside");
    bad = s;
    bad.faces[0].motion.pitch_degrees = std::numeric_limits<double>::quiet_NaN();
    throws_world([&] { render(bad, 64, 64); }, "pitch");
    bad = s;
    bad.faces[0].scale = 0.0;
    throws_world([&] { render(bad, 64, 64); }, "face scale 0 is outside");
    bad = s;
    bad.faces[0].center_x = 1.5;
    throws_world([&] { render(bad, 64, 64); }, "is outside the image");
    throws_world([] { label_of_yaw(std::numeric_limits<double>::quiet_NaN()); }, "yaw must not be NaN");
    CHECK(parse_expression("surprised") == expression::surprised);
    CHECK(parse_yaw("left") == yaw_label::left);
    CHECK(parse_accessories("both") == accessories::both);
}

TEST_CASE("world face crops and whole-picture inputs feed the identity encoder and classifiers", "[world]") {
    const auto s = sample_scene(12, 3, 0);
    const auto r = render(s, 64, 64);
    const auto crop = face_crop(r, 0, 32);
    REQUIRE(crop.size() == 3u * 32 * 32);
    const auto whole = image_input(r, 16);
    REQUIRE(whole.size() == 3u * 16 * 16);
    for (const float v : crop) REQUIRE((v >= -1.0f && v <= 1.0f));
    // The crop is the face: its centre pixel is the centre of the box, resampled.
    const auto& box = r.faces[0].box;
    const int cx = static_cast<int>((box[0] + box[2]) / 2), cy = static_cast<int>((box[1] + box[3]) / 2);
    const double at_centre = (r.rgb[static_cast<std::size_t>((cy * 64 + cx) * 3)] - 127.5) / 127.5;
    CHECK(crop[16 * 32 + 16] == Approx(at_centre).margin(0.25));
    // A picture of one colour gives that colour everywhere.
    rendering flat = r;
    std::fill(flat.rgb.begin(), flat.rgb.end(), std::uint8_t{255});
    for (const float v : face_crop(flat, 0, 8)) CHECK(v == Approx(1.0f));
    for (const float v : image_input(flat, 8)) CHECK(v == Approx(1.0f));
    // Boxes at the border are clamped, never read outside the picture.
    rendering edge = r;
    edge.faces[0].box = {-30.0, -30.0, 5.0, 5.0};
    CHECK(face_crop(edge, 0, 8).size() == 3u * 8 * 8);
    edge.faces[0].box = {60.0, 60.0, 200.0, 200.0};
    CHECK(face_crop(edge, 0, 8).size() == 3u * 8 * 8);
    CHECK_THROWS_AS(face_crop(r, 1, 8), dynamicid::value_error);
    CHECK_THROWS_AS(face_crop(r, 0, 0), dynamicid::value_error);
    CHECK_THROWS_AS(image_input(r, 0), dynamicid::value_error);
}

TEST_CASE("world attribute labels match the scene and its caption", "[world]") {
    for (std::uint64_t k = 0; k < 40; ++k) {
        const auto s = sample_scene(k, k + 1, 2);
        const auto& f = s.faces[0];
        CHECK(label_of(s, 0, attribute::expression) == static_cast<int>(f.motion.expression));
        CHECK(label_of(s, 0, attribute::accessories) == static_cast<int>(f.accessories));
        CHECK(label_of(s, 0, attribute::background) == static_cast<int>(s.background));
        const auto caption = scene_caption(s);
        CHECK(caption.find(std::string(class_name(attribute::expression, label_of(s, 0, attribute::expression)))) != std::string::npos);
        const auto yaw = label_of(s, 0, attribute::yaw);
        CHECK(caption.find(yaw == static_cast<int>(yaw_label::front) ? "front view" : "side view") != std::string::npos);
        const auto pitch = static_cast<pitch_label>(label_of(s, 0, attribute::pitch));
        CHECK((caption.find("facing up") != std::string::npos) == (pitch == pitch_label::up));
        CHECK((caption.find("facing down") != std::string::npos) == (pitch == pitch_label::down));
    }
    for (const auto a : {attribute::expression, attribute::yaw, attribute::pitch, attribute::accessories, attribute::background}) {
        CHECK(parse_attribute(name(a)) == a);
        for (int k = 0; k < classes_of(a); ++k) CHECK(!class_name(a, k).empty());
        CHECK_THROWS_AS(class_name(a, classes_of(a)), dynamicid::value_error);
    }
    CHECK(classes_of(attribute::expression) == 5);
    CHECK(classes_of(attribute::background) == 6);
    CHECK_THROWS_AS(parse_attribute("mood"), dynamicid::value_error);
    CHECK_THROWS_AS(label_of(sample_scene(1, 1, 1), 1, attribute::yaw), dynamicid::value_error);
}
