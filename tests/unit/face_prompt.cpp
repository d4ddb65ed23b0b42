// DynamicID's face prompts and landmark raster (official-semantics.md, sections 1 and 3).
#include <dynamicid/backends/cpu.hpp>
#include <dynamicid/io/safetensors.hpp>
#include <dynamicid/modules/dynamicid/face_prompt.hpp>
#include <dynamicid/modules/dynamicid/landmark_raster.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <filesystem>
#include <limits>
#include <string>
#include <vector>

using namespace dynamicid::modules::imr;

TEST_CASE("inference face prompts use the released wording", "[face_prompt]") {
    CHECK(inference_prompt(expression::happy, {vertical_pose::up, view::side}) == "in a happy expression, facing up, in side view");
    CHECK(inference_prompt(expression::neutral, {}) == "in a neutral expression, in front view");
    CHECK(inference_prompt(expression::sad, {vertical_pose::down, view::front}) == "in a sad expression, facing down, in front view");
    // The classifier's labels are nouns for three classes; the adjective wording is available.
    CHECK(inference_prompt(expression::surprised, {}) == "in a surprise expression, in front view");
    CHECK(inference_prompt(expression::angry, {}) == "in a anger expression, in front view");
    CHECK(inference_prompt(expression::afraid, {vertical_pose::level, view::side}, expression_wording::adjective) ==
          "in a afraid expression, in side view");
    CHECK(inference_prompt("very surprised", "front view") == "in a very surprised expression, front view");

    CHECK(pose_words({vertical_pose::up, view::front}) == "facing up, in front view");
    CHECK(pose_words({vertical_pose::level, view::side}) == "in side view");
}

TEST_CASE("training face prompts use the captions' wording", "[face_prompt]") {
    CHECK(training_prompt(expression::happy, head_turn::slightly_left) == "the expression is happy, the face is slightly turned to the left");
    CHECK(training_prompt(expression::disgusted, head_turn::fully_right) ==
          "the expression is disgusted, the face is fully turned to the right");
    CHECK(training_prompt(expression::afraid, head_turn::front) == "the expression is afraid, the face is front view");
    CHECK(training_prompt("surprised", "slightly turned to the right") ==
          "the expression is surprised, the face is slightly turned to the right");
    CHECK(turn_words(head_turn::fully_left) == "fully turned to the left");
    CHECK(turn_words(head_turn::slightly_right) == "slightly turned to the right");
}

TEST_CASE("expression names parse in both wordings", "[face_prompt]") {
    const std::vector<std::pair<std::string, std::string>> pairs{{"neutral", "neutral"}, {"happy", "happy"},     {"sad", "sad"},
                                                                 {"surprise", "surprised"}, {"anger", "angry"}, {"disgust", "disgusted"},
                                                                 {"fear", "afraid"}};
    for (int i = 0; i < 7; ++i) {
        const auto e = static_cast<expression>(i);
        CHECK(classifier_label(e) == pairs[static_cast<std::size_t>(i)].first);
        CHECK(adjective(e) == pairs[static_cast<std::size_t>(i)].second);
        CHECK(parse_expression(classifier_label(e)) == e);
        CHECK(parse_expression(adjective(e)) == e);
    }
    CHECK(parse_expression("fearful") == expression::afraid);
    CHECK_FALSE(parse_expression("Happy").has_value());
    CHECK_FALSE(parse_expression("contempt").has_value());
}

TEST_CASE("pose words follow the released angle thresholds", "[face_prompt]") {
    // pose_from_angles(pitch, yaw): pitch > 10 up, < -10 down (strict); |yaw| < 10 front.
    CHECK(pose_from_angles(0, 0) == face_pose{vertical_pose::level, view::front});  // also the no-face pose
    CHECK(pose_from_angles(10.0, 0) == face_pose{vertical_pose::level, view::front});
    CHECK(pose_from_angles(10.001, 0) == face_pose{vertical_pose::up, view::front});
    CHECK(pose_from_angles(-10.0, 0) == face_pose{vertical_pose::level, view::front});
    CHECK(pose_from_angles(-10.5, 0) == face_pose{vertical_pose::down, view::front});
    CHECK(pose_from_angles(0, 9.999) == face_pose{vertical_pose::level, view::front});
    CHECK(pose_from_angles(0, 10.0) == face_pose{vertical_pose::level, view::side});
    CHECK(pose_from_angles(0, -10.0) == face_pose{vertical_pose::level, view::side});
    CHECK(pose_from_angles(0, -45.0) == face_pose{vertical_pose::level, view::side});
    CHECK_THROWS_AS(pose_from_angles(std::nan(""), 0), dynamicid::value_error);

    // insightface's face.pose is [pitch, yaw, roll]: element 0 decides up/down, element 1 the view
    // (the released code calls them (yaw, pitch) but uses them this way).
    CHECK(pose_from_insightface({14.0f, -31.0f, 2.0f}) == face_pose{vertical_pose::up, view::side});
    CHECK(pose_from_insightface({3.0f, 25.0f, 80.0f}) == face_pose{vertical_pose::level, view::side});
    CHECK(pose_from_insightface({-25.0f, 3.0f, 0.0f}) == face_pose{vertical_pose::down, view::front});
    CHECK(inference_prompt(expression::happy, pose_from_insightface({14.0f, -31.0f, 2.0f})) ==
          "in a happy expression, facing up, in side view");
    const std::vector<float> one{1.0f};
    CHECK_THROWS_AS(pose_from_insightface(one), dynamicid::value_error);
}

TEST_CASE("landmark raster matches the rule-derived fixture exactly", "[face_prompt][landmark]") {
    const auto file = dynamicid::io::safetensors_file::open(std::filesystem::path(DYNAMICID_TEST_DATA_DIR) / "face" /
                                                            "landmark_raster.safetensors");
    const auto points = file.to_vector<float>("input.points");
    const auto expected = file.to_vector<float>("output.raster");
    REQUIRE(points.size() == 2 * 106 * 2);
    std::vector<std::vector<landmark_point>> faces(2);
    for (std::size_t f = 0; f < 2; ++f)
        for (std::size_t i = 0; i < 106; ++i) faces[f].push_back({points[(f * 106 + i) * 2], points[(f * 106 + i) * 2 + 1]});

    dynamicid::cpu_backend::context ctx;
    const auto img = landmark_raster<dynamicid::cpu_backend>(ctx, faces);
    CHECK(img.shape() == dynamicid::shape{2, 1, 96, 96});
    const auto got = img.to_host(ctx);
    REQUIRE(got.size() == expected.size());
    std::size_t mismatches = 0;
    for (std::size_t i = 0; i < got.size(); ++i) mismatches += got[i] != expected[i];
    CHECK(mismatches == 0);
}

TEST_CASE("landmark raster rules", "[face_prompt][landmark]") {
    const auto lit = [](const std::vector<float>& img) {
        std::vector<std::size_t> out;
        std::size_t other = 0;
        for (std::size_t i = 0; i < img.size(); ++i)
            if (img[i] == 1.0f) out.push_back(i);
            else other += img[i] != -1.0f;
        CHECK(other == 0);
        return out;
    };
    landmark_raster_config any;
    any.points = 0;
    // (x, y) = (100, 60) on 512 -> (18.75, 11.25) -> row 11, column 18.
    CHECK(lit(rasterize_landmarks(std::vector<landmark_point>{{100.0f, 60.0f}}, any)) == std::vector<std::size_t>{11 * 96 + 18});
    // On or outside the border: dropped; NaN dropped.
    const float nan = std::numeric_limits<float>::quiet_NaN();
    CHECK(lit(rasterize_landmarks(std::vector<landmark_point>{{0.0f, 50.0f}, {50.0f, 512.0f}, {-1.0f, 5.0f}, {nan, 5.0f}}, any)).empty());
    // Just inside the far border lands in the last pixel; two points on one pixel light it once.
    CHECK(lit(rasterize_landmarks(std::vector<landmark_point>{{511.9f, 511.9f}, {511.5f, 511.5f}}, any)) ==
          std::vector<std::size_t>{95 * 96 + 95});
    // Other detection sizes scale each axis.
    landmark_raster_config wide = any;
    wide.source_width = 1024.0;
    CHECK(lit(rasterize_landmarks(std::vector<landmark_point>{{200.0f, 60.0f}}, wide)) == std::vector<std::size_t>{11 * 96 + 18});
    // The released detector gives 106 points.
    CHECK_THROWS_AS(rasterize_landmarks(std::vector<landmark_point>(5)), dynamicid::value_error);

    dynamicid::cpu_backend::context ctx;
    std::vector<std::uint8_t> gray(96 * 96, 0);
    gray[5] = 255;
    const auto img = landmark_image<dynamicid::cpu_backend>(ctx, gray).to_host(ctx);
    CHECK(img[5] == 1.0f);
    CHECK(img[6] == -1.0f);
    CHECK_THROWS_AS(landmark_image<dynamicid::cpu_backend>(ctx, std::span<const std::uint8_t>(gray).first(10)), dynamicid::value_error);
}
