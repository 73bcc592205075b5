-- Airflow 3.3.2 metadata schema (mysql), made by `airflow db migrate` and dumped by python -m tests.airflow_schemas.generate.

/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;
/*!40101 SET @OLD_CHARACTER_SET_RESULTS=@@CHARACTER_SET_RESULTS */;
/*!40101 SET @OLD_COLLATION_CONNECTION=@@COLLATION_CONNECTION */;
/*!40101 SET NAMES utf8mb4 */;
/*!40103 SET @OLD_TIME_ZONE=@@TIME_ZONE */;
/*!40103 SET TIME_ZONE='+00:00' */;
/*!40014 SET @OLD_UNIQUE_CHECKS=@@UNIQUE_CHECKS, UNIQUE_CHECKS=0 */;
/*!40014 SET @OLD_FOREIGN_KEY_CHECKS=@@FOREIGN_KEY_CHECKS, FOREIGN_KEY_CHECKS=0 */;
/*!40101 SET @OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='NO_AUTO_VALUE_ON_ZERO' */;
/*!40111 SET @OLD_SQL_NOTES=@@SQL_NOTES, SQL_NOTES=0 */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `alembic_version` (
  `version_num` varchar(32) NOT NULL,
  PRIMARY KEY (`version_num`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `name` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `uri` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `group` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `extra` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`extra`)),
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `idx_asset_name_uri_unique` (`name`,`uri`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_active` (
  `name` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `uri` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  PRIMARY KEY (`name`,`uri`),
  UNIQUE KEY `idx_asset_active_name_unique` (`name`),
  UNIQUE KEY `idx_asset_active_uri_unique` (`uri`),
  CONSTRAINT `asset_active_asset_name_uri_fkey` FOREIGN KEY (`name`, `uri`) REFERENCES `asset` (`name`, `uri`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_alias` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `name` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `group` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `idx_asset_alias_name_unique` (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_alias_asset` (
  `alias_id` int(11) NOT NULL,
  `asset_id` int(11) NOT NULL,
  PRIMARY KEY (`alias_id`,`asset_id`),
  KEY `idx_asset_alias_asset_alias_id` (`alias_id`),
  KEY `idx_asset_alias_asset_asset_id` (`asset_id`),
  CONSTRAINT `asset_alias_asset_alias_id_fkey` FOREIGN KEY (`alias_id`) REFERENCES `asset_alias` (`id`) ON DELETE CASCADE,
  CONSTRAINT `asset_alias_asset_asset_id_fkey` FOREIGN KEY (`asset_id`) REFERENCES `asset` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_alias_asset_event` (
  `alias_id` int(11) NOT NULL,
  `event_id` int(11) NOT NULL,
  PRIMARY KEY (`alias_id`,`event_id`),
  KEY `idx_asset_alias_asset_event_alias_id` (`alias_id`),
  KEY `idx_asset_alias_asset_event_event_id` (`event_id`),
  CONSTRAINT `asset_alias_asset_event_alias_id_fkey` FOREIGN KEY (`alias_id`) REFERENCES `asset_alias` (`id`) ON DELETE CASCADE,
  CONSTRAINT `asset_alias_asset_event_event_id_fkey` FOREIGN KEY (`event_id`) REFERENCES `asset_event` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_dag_run_queue` (
  `asset_id` int(11) NOT NULL,
  `target_dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`asset_id`,`target_dag_id`),
  KEY `idx_asset_dag_run_queue_target_dag_id` (`target_dag_id`),
  CONSTRAINT `adrq_asset_fkey` FOREIGN KEY (`asset_id`) REFERENCES `asset` (`id`) ON DELETE CASCADE,
  CONSTRAINT `adrq_dag_fkey` FOREIGN KEY (`target_dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_event` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `asset_id` int(11) NOT NULL,
  `extra` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`extra`)),
  `source_task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `source_dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `source_run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `source_map_index` int(11) DEFAULT -1,
  `timestamp` timestamp(6) NOT NULL,
  `partition_key` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_asset_id_timestamp` (`asset_id`,`timestamp`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_partition_dag_run` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `target_dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `created_dag_run_id` int(11) DEFAULT NULL,
  `partition_key` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `partition_date` timestamp(6) NULL DEFAULT NULL,
  `rollup_fingerprint` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`rollup_fingerprint`)),
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`id`),
  KEY `apdr_created_dag_run_id_fkey` (`created_dag_run_id`),
  CONSTRAINT `apdr_created_dag_run_id_fkey` FOREIGN KEY (`created_dag_run_id`) REFERENCES `dag_run` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_state_store` (
  `asset_id` int(11) NOT NULL,
  `key` varchar(512) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `value` mediumtext NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  `last_updated_by_kind` varchar(16) DEFAULT NULL,
  `last_updated_by_dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `last_updated_by_run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `last_updated_by_task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `last_updated_by_map_index` int(11) DEFAULT NULL,
  PRIMARY KEY (`asset_id`,`key`),
  CONSTRAINT `asset_state_store_asset_fkey` FOREIGN KEY (`asset_id`) REFERENCES `asset` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `asset_watcher` (
  `name` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `asset_id` int(11) NOT NULL,
  `trigger_id` int(11) NOT NULL,
  PRIMARY KEY (`asset_id`,`trigger_id`),
  KEY `idx_awm_trigger_id` (`trigger_id`),
  CONSTRAINT `awm_asset_id_fkey` FOREIGN KEY (`asset_id`) REFERENCES `asset` (`id`) ON DELETE CASCADE,
  CONSTRAINT `awm_trigger_id_fkey` FOREIGN KEY (`trigger_id`) REFERENCES `trigger` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `backfill` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `from_date` timestamp(6) NOT NULL,
  `to_date` timestamp(6) NOT NULL,
  `dag_run_conf` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`dag_run_conf`)),
  `is_paused` tinyint(1) DEFAULT NULL,
  `reprocess_behavior` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `max_active_runs` int(11) NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  `completed_at` timestamp(6) NULL DEFAULT NULL,
  `updated_at` timestamp(6) NOT NULL,
  `triggering_user_name` varchar(512) DEFAULT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `backfill_dag_run` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `backfill_id` int(11) NOT NULL,
  `dag_run_id` int(11) DEFAULT NULL,
  `exception_reason` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `logical_date` timestamp(6) NULL DEFAULT NULL,
  `partition_key` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `sort_ordinal` int(11) NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `ix_bdr_backfill_id_dag_run_id` (`backfill_id`,`dag_run_id`),
  KEY `bdr_dag_run_fkey` (`dag_run_id`),
  CONSTRAINT `bdr_backfill_fkey` FOREIGN KEY (`backfill_id`) REFERENCES `backfill` (`id`) ON DELETE CASCADE,
  CONSTRAINT `bdr_dag_run_fkey` FOREIGN KEY (`dag_run_id`) REFERENCES `dag_run` (`id`) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `callback` (
  `id` uuid NOT NULL,
  `type` varchar(20) NOT NULL,
  `fetch_method` varchar(20) NOT NULL,
  `data` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`data`)),
  `bundle_name` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `state` varchar(10) DEFAULT NULL,
  `output` text DEFAULT NULL,
  `priority_weight` int(11) NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  `trigger_id` int(11) DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `callback_trigger_id_fkey` (`trigger_id`),
  CONSTRAINT `callback_trigger_id_fkey` FOREIGN KEY (`trigger_id`) REFERENCES `trigger` (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `connection` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `conn_id` varchar(250) NOT NULL,
  `conn_type` varchar(500) NOT NULL,
  `description` text DEFAULT NULL,
  `host` varchar(500) DEFAULT NULL,
  `schema` varchar(500) DEFAULT NULL,
  `login` text DEFAULT NULL,
  `port` int(11) DEFAULT NULL,
  `team_name` varchar(50) DEFAULT NULL,
  `password` text DEFAULT NULL,
  `extra` text DEFAULT NULL,
  `is_encrypted` tinyint(1) NOT NULL,
  `is_extra_encrypted` tinyint(1) NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `connection_conn_id_uq` (`conn_id`),
  KEY `connection_team_name_fkey` (`team_name`),
  CONSTRAINT `connection_team_name_fkey` FOREIGN KEY (`team_name`) REFERENCES `team` (`name`) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `connection_test_request` (
  `id` uuid NOT NULL,
  `token` varchar(64) NOT NULL,
  `connection_id` varchar(250) NOT NULL,
  `state` varchar(20) NOT NULL,
  `result_message` varchar(2000) DEFAULT NULL,
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  `executor` varchar(256) DEFAULT NULL,
  `queue` varchar(256) DEFAULT NULL,
  `conn_type` varchar(500) NOT NULL,
  `host` varchar(500) DEFAULT NULL,
  `login` text DEFAULT NULL,
  `schema` varchar(500) DEFAULT NULL,
  `port` int(11) DEFAULT NULL,
  `commit_on_success` tinyint(1) NOT NULL DEFAULT 0,
  `is_encrypted` tinyint(1) NOT NULL DEFAULT 0,
  `is_extra_encrypted` tinyint(1) NOT NULL DEFAULT 0,
  `active_connection_id` varchar(250) DEFAULT NULL,
  `team_name` varchar(50) DEFAULT NULL,
  `password` text DEFAULT NULL,
  `extra` text DEFAULT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `connection_test_request_token_uq` (`token`),
  UNIQUE KEY `uq_connection_test_request_active_conn` (`active_connection_id`),
  KEY `idx_connection_test_request_state_created_at` (`state`,`created_at`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag` (
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `is_paused` tinyint(1) NOT NULL,
  `is_stale` tinyint(1) NOT NULL,
  `exceeds_max_non_backfill` tinyint(1) NOT NULL DEFAULT 0,
  `last_parsed_time` timestamp(6) NULL DEFAULT NULL,
  `last_parse_duration` float DEFAULT NULL,
  `last_expired` timestamp(6) NULL DEFAULT NULL,
  `fileloc` varchar(2000) DEFAULT NULL,
  `relative_fileloc` varchar(2000) DEFAULT NULL,
  `bundle_name` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `bundle_version` varchar(200) DEFAULT NULL,
  `owners` varchar(2000) DEFAULT NULL,
  `dag_display_name` varchar(2000) DEFAULT NULL,
  `description` text DEFAULT NULL,
  `timetable_type` varchar(255) NOT NULL,
  `timetable_summary` text DEFAULT NULL,
  `timetable_description` varchar(1000) DEFAULT NULL,
  `timetable_partitioned` tinyint(1) NOT NULL DEFAULT 0,
  `timetable_periodic` tinyint(1) NOT NULL DEFAULT 0,
  `partition_mapper_info` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`partition_mapper_info`)),
  `asset_expression` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`asset_expression`)),
  `deadline` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`deadline`)),
  `max_active_tasks` int(11) NOT NULL,
  `max_active_runs` int(11) DEFAULT NULL,
  `max_consecutive_failed_dag_runs` int(11) NOT NULL,
  `has_task_concurrency_limits` tinyint(1) NOT NULL,
  `has_import_errors` tinyint(1) DEFAULT 0,
  `fail_fast` tinyint(1) NOT NULL DEFAULT 0,
  `allowed_run_types` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`allowed_run_types`)),
  `next_dagrun` timestamp(6) NULL DEFAULT NULL,
  `next_dagrun_data_interval_start` timestamp(6) NULL DEFAULT NULL,
  `next_dagrun_data_interval_end` timestamp(6) NULL DEFAULT NULL,
  `next_dagrun_partition_key` varchar(255) DEFAULT NULL,
  `next_dagrun_partition_date` timestamp(6) NULL DEFAULT NULL,
  `next_dagrun_create_after` timestamp(6) NULL DEFAULT NULL,
  PRIMARY KEY (`dag_id`),
  KEY `dag_bundle_name_fkey` (`bundle_name`),
  KEY `idx_next_dagrun_create_after` (`next_dagrun_create_after`),
  CONSTRAINT `dag_bundle_name_fkey` FOREIGN KEY (`bundle_name`) REFERENCES `dag_bundle` (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_bundle` (
  `name` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `active` tinyint(1) DEFAULT NULL,
  `version` varchar(200) DEFAULT NULL,
  `last_refreshed` timestamp(6) NULL DEFAULT NULL,
  `signed_url_template` text DEFAULT NULL,
  `template_params` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`template_params`)),
  PRIMARY KEY (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_bundle_team` (
  `dag_bundle_name` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `team_name` varchar(50) NOT NULL,
  PRIMARY KEY (`dag_bundle_name`,`team_name`),
  UNIQUE KEY `idx_dag_bundle_team_dag_bundle_name` (`dag_bundle_name`),
  KEY `idx_dag_bundle_team_team_name` (`team_name`),
  CONSTRAINT `dag_bundle_team_dag_bundle_name_fkey` FOREIGN KEY (`dag_bundle_name`) REFERENCES `dag_bundle` (`name`) ON DELETE CASCADE,
  CONSTRAINT `dag_bundle_team_team_name_fkey` FOREIGN KEY (`team_name`) REFERENCES `team` (`name`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_code` (
  `id` uuid NOT NULL,
  `dag_id` varchar(250) NOT NULL,
  `fileloc` varchar(2000) NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  `last_updated` timestamp(6) NOT NULL,
  `source_code` mediumtext NOT NULL,
  `source_code_hash` varchar(32) NOT NULL,
  `dag_version_id` uuid NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `dag_code_dag_version_id_uq` (`dag_version_id`),
  CONSTRAINT `dag_code_dag_version_id_fkey` FOREIGN KEY (`dag_version_id`) REFERENCES `dag_version` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_favorite` (
  `user_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  PRIMARY KEY (`user_id`,`dag_id`),
  KEY `dag_favorite_dag_id_fkey` (`dag_id`),
  CONSTRAINT `dag_favorite_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_owner_attributes` (
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `owner` varchar(500) NOT NULL,
  `link` varchar(500) NOT NULL,
  PRIMARY KEY (`dag_id`,`owner`),
  CONSTRAINT `dag.dag_id` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_priority_parsing_request` (
  `id` varchar(32) NOT NULL,
  `bundle_name` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `relative_fileloc` varchar(2000) NOT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_run` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `queued_at` timestamp(6) NULL DEFAULT NULL,
  `logical_date` timestamp(6) NULL DEFAULT NULL,
  `start_date` timestamp(6) NULL DEFAULT NULL,
  `end_date` timestamp(6) NULL DEFAULT NULL,
  `state` varchar(50) DEFAULT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `creating_job_id` int(11) DEFAULT NULL,
  `run_type` varchar(50) NOT NULL,
  `triggered_by` varchar(50) DEFAULT NULL,
  `triggering_user_name` varchar(512) DEFAULT NULL,
  `conf` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`conf`)),
  `data_interval_start` timestamp(6) NULL DEFAULT NULL,
  `data_interval_end` timestamp(6) NULL DEFAULT NULL,
  `run_after` timestamp(6) NOT NULL,
  `last_scheduling_decision` timestamp(6) NULL DEFAULT NULL,
  `log_template_id` int(11) DEFAULT NULL,
  `created_at` timestamp(6) NULL DEFAULT NULL,
  `updated_at` timestamp(6) NULL DEFAULT NULL,
  `clear_number` int(11) NOT NULL DEFAULT 0,
  `backfill_id` int(11) DEFAULT NULL,
  `bundle_version` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `scheduled_by_job_id` int(11) DEFAULT NULL,
  `context_carrier` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`context_carrier`)),
  `span_status` varchar(250) NOT NULL DEFAULT 'not_started',
  `created_dag_version_id` uuid DEFAULT NULL,
  `partition_key` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `partition_date` timestamp(6) NULL DEFAULT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `dag_run_dag_id_logical_date_key` (`dag_id`,`logical_date`),
  UNIQUE KEY `dag_run_dag_id_run_id_key` (`dag_id`,`run_id`),
  KEY `dag_id_state` (`dag_id`,`state`),
  KEY `dag_run_backfill_id_fkey` (`backfill_id`),
  KEY `idx_dag_run_created_dag_version_id` (`created_dag_version_id`),
  KEY `idx_dag_run_dag_id` (`dag_id`),
  KEY `idx_dag_run_queued_dags` (`state`,`dag_id`),
  KEY `idx_dag_run_run_after` (`run_after`),
  KEY `idx_dag_run_running_dags` (`state`,`dag_id`),
  KEY `task_instance_log_template_id_fkey` (`log_template_id`),
  CONSTRAINT `created_dag_version_id_fkey` FOREIGN KEY (`created_dag_version_id`) REFERENCES `dag_version` (`id`) ON DELETE SET NULL,
  CONSTRAINT `dag_run_backfill_id_fkey` FOREIGN KEY (`backfill_id`) REFERENCES `backfill` (`id`),
  CONSTRAINT `task_instance_log_template_id_fkey` FOREIGN KEY (`log_template_id`) REFERENCES `log_template` (`id`) ON DELETE NO ACTION
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_run_note` (
  `user_id` varchar(128) DEFAULT NULL,
  `dag_run_id` int(11) NOT NULL,
  `content` text DEFAULT NULL,
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`dag_run_id`),
  CONSTRAINT `dag_run_note_dr_fkey` FOREIGN KEY (`dag_run_id`) REFERENCES `dag_run` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_schedule_asset_alias_reference` (
  `alias_id` int(11) NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`alias_id`,`dag_id`),
  KEY `idx_dag_schedule_asset_alias_reference_dag_id` (`dag_id`),
  CONSTRAINT `dsaar_asset_alias_fkey` FOREIGN KEY (`alias_id`) REFERENCES `asset_alias` (`id`) ON DELETE CASCADE,
  CONSTRAINT `dsaar_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_schedule_asset_name_reference` (
  `name` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`name`,`dag_id`),
  KEY `idx_dag_schedule_asset_name_reference_dag_id` (`dag_id`),
  CONSTRAINT `dsanr_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_schedule_asset_reference` (
  `asset_id` int(11) NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `allow_producer_teams` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`allow_producer_teams`)),
  `allow_global_producers` tinyint(1) NOT NULL DEFAULT 1,
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`asset_id`,`dag_id`),
  KEY `idx_dag_schedule_asset_reference_dag_id` (`dag_id`),
  CONSTRAINT `dsar_asset_fkey` FOREIGN KEY (`asset_id`) REFERENCES `asset` (`id`) ON DELETE CASCADE,
  CONSTRAINT `dsar_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_schedule_asset_uri_reference` (
  `uri` varchar(1500) CHARACTER SET latin1 COLLATE latin1_general_cs NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`uri`,`dag_id`),
  KEY `idx_dag_schedule_asset_uri_reference_dag_id` (`dag_id`),
  CONSTRAINT `dsaur_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_tag` (
  `name` varchar(100) NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  PRIMARY KEY (`name`,`dag_id`),
  KEY `idx_dag_tag_dag_id` (`dag_id`),
  CONSTRAINT `dag_tag_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_version` (
  `id` uuid NOT NULL,
  `version_number` int(11) NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `bundle_name` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `bundle_version` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `version_data` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`version_data`)),
  `created_at` timestamp(6) NOT NULL,
  `last_updated` timestamp(6) NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `dag_id_v_name_v_number_unique_constraint` (`dag_id`,`version_number`),
  CONSTRAINT `dag_version_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dag_warning` (
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `warning_type` varchar(50) NOT NULL,
  `message` text NOT NULL,
  `timestamp` timestamp(6) NOT NULL,
  PRIMARY KEY (`dag_id`,`warning_type`),
  KEY `idx_dag_warning_dag_id` (`dag_id`),
  CONSTRAINT `dcw_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `dagrun_asset_event` (
  `dag_run_id` int(11) NOT NULL,
  `event_id` int(11) NOT NULL,
  PRIMARY KEY (`dag_run_id`,`event_id`),
  KEY `idx_dagrun_asset_events_dag_run_id` (`dag_run_id`),
  KEY `idx_dagrun_asset_events_event_id` (`event_id`),
  CONSTRAINT `dagrun_asset_event_dag_run_id_fkey` FOREIGN KEY (`dag_run_id`) REFERENCES `dag_run` (`id`) ON DELETE CASCADE,
  CONSTRAINT `dagrun_asset_event_event_id_fkey` FOREIGN KEY (`event_id`) REFERENCES `asset_event` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `deadline` (
  `id` uuid NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  `last_updated_at` timestamp(6) NOT NULL,
  `dagrun_id` int(11) DEFAULT NULL,
  `deadline_time` timestamp(6) NOT NULL,
  `missed` tinyint(1) NOT NULL,
  `callback_id` uuid NOT NULL,
  `deadline_alert_id` uuid DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `deadline_callback_id_idx` (`callback_id`),
  KEY `deadline_dagrun_id_fkey` (`dagrun_id`),
  KEY `deadline_deadline_alert_id_fkey` (`deadline_alert_id`),
  KEY `deadline_missed_deadline_time_idx` (`missed`,`deadline_time`),
  CONSTRAINT `deadline_callback_id_fkey` FOREIGN KEY (`callback_id`) REFERENCES `callback` (`id`) ON DELETE CASCADE,
  CONSTRAINT `deadline_dagrun_id_fkey` FOREIGN KEY (`dagrun_id`) REFERENCES `dag_run` (`id`) ON DELETE CASCADE,
  CONSTRAINT `deadline_deadline_alert_id_fkey` FOREIGN KEY (`deadline_alert_id`) REFERENCES `deadline_alert` (`id`) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `deadline_alert` (
  `id` uuid NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  `serialized_dag_id` uuid NOT NULL,
  `name` varchar(250) DEFAULT NULL,
  `description` text DEFAULT NULL,
  `reference` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`reference`)),
  `interval` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`interval`)),
  `callback_def` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`callback_def`)),
  PRIMARY KEY (`id`),
  KEY `deadline_alert_serialized_dag_id_fkey` (`serialized_dag_id`),
  CONSTRAINT `deadline_alert_serialized_dag_id_fkey` FOREIGN KEY (`serialized_dag_id`) REFERENCES `serialized_dag` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `hitl_detail` (
  `ti_id` uuid NOT NULL,
  `options` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`options`)),
  `subject` text NOT NULL,
  `body` text DEFAULT NULL,
  `defaults` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`defaults`)),
  `multiple` tinyint(1) DEFAULT NULL,
  `params` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`params`)),
  `assignees` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`assignees`)),
  `created_at` timestamp(6) NOT NULL,
  `responded_at` timestamp(6) NULL DEFAULT NULL,
  `responded_by` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`responded_by`)),
  `chosen_options` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`chosen_options`)),
  `params_input` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`params_input`)),
  PRIMARY KEY (`ti_id`),
  CONSTRAINT `hitl_detail_ti_fkey` FOREIGN KEY (`ti_id`) REFERENCES `task_instance` (`id`) ON DELETE CASCADE ON UPDATE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `hitl_detail_history` (
  `ti_history_id` uuid NOT NULL,
  `options` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`options`)),
  `subject` text NOT NULL,
  `body` text DEFAULT NULL,
  `defaults` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`defaults`)),
  `multiple` tinyint(1) DEFAULT NULL,
  `params` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`params`)),
  `assignees` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`assignees`)),
  `created_at` timestamp(6) NOT NULL,
  `responded_at` timestamp(6) NULL DEFAULT NULL,
  `responded_by` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`responded_by`)),
  `chosen_options` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`chosen_options`)),
  `params_input` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`params_input`)),
  PRIMARY KEY (`ti_history_id`),
  CONSTRAINT `hitl_detail_history_tih_fkey` FOREIGN KEY (`ti_history_id`) REFERENCES `task_instance_history` (`task_instance_id`) ON DELETE CASCADE ON UPDATE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `import_error` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `timestamp` timestamp(6) NULL DEFAULT NULL,
  `filename` varchar(1024) DEFAULT NULL,
  `bundle_name` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `stacktrace` text DEFAULT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `job` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `dag_id` varchar(250) DEFAULT NULL,
  `state` varchar(20) DEFAULT NULL,
  `job_type` varchar(30) DEFAULT NULL,
  `start_date` timestamp(6) NULL DEFAULT NULL,
  `end_date` timestamp(6) NULL DEFAULT NULL,
  `latest_heartbeat` timestamp(6) NULL DEFAULT NULL,
  `executor_class` varchar(500) DEFAULT NULL,
  `hostname` varchar(500) DEFAULT NULL,
  `unixname` varchar(1000) DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_job_dag_id` (`dag_id`),
  KEY `idx_job_state_heartbeat` (`state`,`latest_heartbeat`),
  KEY `job_type_heart` (`job_type`,`latest_heartbeat`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `log` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `dttm` timestamp(6) NULL DEFAULT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `map_index` int(11) DEFAULT NULL,
  `event` varchar(60) NOT NULL,
  `logical_date` timestamp(6) NULL DEFAULT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin DEFAULT NULL,
  `owner` varchar(500) DEFAULT NULL,
  `owner_display_name` varchar(500) DEFAULT NULL,
  `extra` text DEFAULT NULL,
  `try_number` int(11) DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_log_dttm` (`dttm`),
  KEY `idx_log_event` (`event`),
  KEY `idx_log_task_instance` (`dag_id`,`task_id`,`run_id`,`map_index`,`try_number`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `log_template` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `filename` text NOT NULL,
  `elasticsearch_id` text NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`id`)
) ENGINE=InnoDB AUTO_INCREMENT=3 DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `partitioned_asset_key_log` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `asset_id` int(11) NOT NULL,
  `asset_event_id` int(11) NOT NULL,
  `asset_partition_dag_run_id` int(11) NOT NULL,
  `source_partition_key` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `target_dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `target_partition_key` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_pakl_apdr_id` (`asset_partition_dag_run_id`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `rendered_task_instance_fields` (
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `map_index` int(11) NOT NULL DEFAULT -1,
  `rendered_fields` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin NOT NULL CHECK (json_valid(`rendered_fields`)),
  `k8s_pod_yaml` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`k8s_pod_yaml`)),
  PRIMARY KEY (`dag_id`,`task_id`,`run_id`,`map_index`),
  CONSTRAINT `rtif_ti_fkey` FOREIGN KEY (`dag_id`, `task_id`, `run_id`, `map_index`) REFERENCES `task_instance` (`dag_id`, `task_id`, `run_id`, `map_index`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `revoked_token` (
  `jti` varchar(32) NOT NULL,
  `exp` timestamp(6) NOT NULL,
  PRIMARY KEY (`jti`),
  KEY `idx_revoked_token_exp` (`exp`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `serialized_dag` (
  `id` uuid NOT NULL,
  `dag_id` varchar(250) NOT NULL,
  `data` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`data`)),
  `data_compressed` blob DEFAULT NULL,
  `created_at` timestamp(6) NOT NULL,
  `last_updated` timestamp(6) NOT NULL,
  `dag_hash` varchar(32) NOT NULL,
  `dag_version_id` uuid NOT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `serialized_dag_dag_version_id_uq` (`dag_version_id`),
  CONSTRAINT `serialized_dag_dag_version_id_fkey` FOREIGN KEY (`dag_version_id`) REFERENCES `dag_version` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `slot_pool` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `pool` varchar(256) DEFAULT NULL,
  `slots` int(11) NOT NULL,
  `description` text DEFAULT NULL,
  `include_deferred` tinyint(1) NOT NULL,
  `team_name` varchar(50) DEFAULT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `slot_pool_pool_uq` (`pool`),
  KEY `slot_pool_team_name_fkey` (`team_name`),
  CONSTRAINT `slot_pool_team_name_fkey` FOREIGN KEY (`team_name`) REFERENCES `team` (`name`) ON DELETE SET NULL
) ENGINE=InnoDB AUTO_INCREMENT=2 DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_inlet_asset_reference` (
  `asset_id` int(11) NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`asset_id`,`dag_id`,`task_id`),
  KEY `idx_task_inlet_asset_reference_dag_id` (`dag_id`),
  CONSTRAINT `tiar_asset_fkey` FOREIGN KEY (`asset_id`) REFERENCES `asset` (`id`) ON DELETE CASCADE,
  CONSTRAINT `tiar_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_instance` (
  `id` uuid NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `map_index` int(11) NOT NULL DEFAULT -1,
  `start_date` timestamp(6) NULL DEFAULT NULL,
  `end_date` timestamp(6) NULL DEFAULT NULL,
  `duration` float DEFAULT NULL,
  `state` varchar(20) DEFAULT NULL,
  `try_number` int(11) NOT NULL,
  `max_tries` int(11) NOT NULL DEFAULT -1,
  `hostname` varchar(1000) DEFAULT NULL,
  `unixname` varchar(1000) DEFAULT NULL,
  `pool` varchar(256) NOT NULL,
  `pool_slots` int(11) NOT NULL,
  `queue` varchar(256) DEFAULT NULL,
  `priority_weight` int(11) DEFAULT NULL,
  `operator` varchar(1000) DEFAULT NULL,
  `custom_operator_name` varchar(1000) DEFAULT NULL,
  `queued_dttm` timestamp(6) NULL DEFAULT NULL,
  `scheduled_dttm` timestamp(6) NULL DEFAULT NULL,
  `queued_by_job_id` int(11) DEFAULT NULL,
  `last_heartbeat_at` timestamp(6) NULL DEFAULT NULL,
  `pid` int(11) DEFAULT NULL,
  `executor` varchar(1000) DEFAULT NULL,
  `executor_config` blob DEFAULT NULL,
  `updated_at` timestamp(6) NULL DEFAULT NULL,
  `rendered_map_index` varchar(250) DEFAULT NULL,
  `context_carrier` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`context_carrier`)),
  `span_status` varchar(250) NOT NULL DEFAULT 'not_started',
  `external_executor_id` text DEFAULT NULL,
  `trigger_id` int(11) DEFAULT NULL,
  `trigger_timeout` timestamp(6) NULL DEFAULT NULL,
  `next_method` varchar(1000) DEFAULT NULL,
  `next_kwargs` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`next_kwargs`)),
  `task_display_name` varchar(2000) DEFAULT NULL,
  `dag_version_id` uuid DEFAULT NULL,
  `retry_delay_override` float DEFAULT NULL,
  `retry_reason` varchar(500) DEFAULT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `task_instance_composite_key` (`dag_id`,`task_id`,`run_id`,`map_index`),
  KEY `ti_dag_run` (`dag_id`,`run_id`),
  KEY `ti_dag_state` (`dag_id`,`state`),
  KEY `ti_dag_version_id` (`dag_version_id`),
  KEY `ti_heartbeat` (`last_heartbeat_at`),
  KEY `ti_pool` (`pool`,`state`,`priority_weight`),
  KEY `ti_state_lkp` (`dag_id`,`task_id`,`run_id`,`state`),
  KEY `ti_state` (`state`),
  KEY `ti_trigger_id` (`trigger_id`),
  CONSTRAINT `task_instance_dag_run_fkey` FOREIGN KEY (`dag_id`, `run_id`) REFERENCES `dag_run` (`dag_id`, `run_id`) ON DELETE CASCADE,
  CONSTRAINT `task_instance_dag_version_id_fkey` FOREIGN KEY (`dag_version_id`) REFERENCES `dag_version` (`id`),
  CONSTRAINT `task_instance_trigger_id_fkey` FOREIGN KEY (`trigger_id`) REFERENCES `trigger` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_instance_history` (
  `task_instance_id` uuid NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `map_index` int(11) NOT NULL DEFAULT -1,
  `try_number` int(11) NOT NULL,
  `start_date` timestamp(6) NULL DEFAULT NULL,
  `end_date` timestamp(6) NULL DEFAULT NULL,
  `duration` float DEFAULT NULL,
  `state` varchar(20) DEFAULT NULL,
  `max_tries` int(11) DEFAULT -1,
  `hostname` varchar(1000) DEFAULT NULL,
  `unixname` varchar(1000) DEFAULT NULL,
  `pool` varchar(256) NOT NULL,
  `pool_slots` int(11) NOT NULL,
  `queue` varchar(256) DEFAULT NULL,
  `priority_weight` int(11) DEFAULT NULL,
  `operator` varchar(1000) DEFAULT NULL,
  `custom_operator_name` varchar(1000) DEFAULT NULL,
  `queued_dttm` timestamp(6) NULL DEFAULT NULL,
  `scheduled_dttm` timestamp(6) NULL DEFAULT NULL,
  `queued_by_job_id` int(11) DEFAULT NULL,
  `pid` int(11) DEFAULT NULL,
  `executor` varchar(1000) DEFAULT NULL,
  `executor_config` blob DEFAULT NULL,
  `updated_at` timestamp(6) NULL DEFAULT NULL,
  `rendered_map_index` varchar(250) DEFAULT NULL,
  `context_carrier` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`context_carrier`)),
  `span_status` varchar(250) NOT NULL DEFAULT 'not_started',
  `external_executor_id` text DEFAULT NULL,
  `trigger_id` int(11) DEFAULT NULL,
  `trigger_timeout` datetime DEFAULT NULL,
  `next_method` varchar(1000) DEFAULT NULL,
  `next_kwargs` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`next_kwargs`)),
  `task_display_name` varchar(2000) DEFAULT NULL,
  `dag_version_id` uuid DEFAULT NULL,
  `retry_delay_override` float DEFAULT NULL,
  `retry_reason` varchar(500) DEFAULT NULL,
  PRIMARY KEY (`task_instance_id`),
  UNIQUE KEY `task_instance_history_dtrt_uq` (`dag_id`,`task_id`,`run_id`,`map_index`,`try_number`),
  KEY `idx_tih_dag_run` (`dag_id`,`run_id`),
  CONSTRAINT `task_instance_history_ti_fkey` FOREIGN KEY (`dag_id`, `task_id`, `run_id`, `map_index`) REFERENCES `task_instance` (`dag_id`, `task_id`, `run_id`, `map_index`) ON DELETE CASCADE ON UPDATE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_instance_note` (
  `ti_id` uuid NOT NULL,
  `user_id` varchar(128) DEFAULT NULL,
  `content` text DEFAULT NULL,
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`ti_id`),
  CONSTRAINT `task_instance_note_ti_fkey` FOREIGN KEY (`ti_id`) REFERENCES `task_instance` (`id`) ON DELETE CASCADE ON UPDATE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_map` (
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `map_index` int(11) NOT NULL,
  `length` int(11) NOT NULL,
  `keys` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`keys`)),
  PRIMARY KEY (`dag_id`,`task_id`,`run_id`,`map_index`),
  CONSTRAINT `ck_task_map_task_map_length_not_negative` CHECK (`length` >= 0),
  CONSTRAINT `task_map_task_instance_fkey` FOREIGN KEY (`dag_id`, `task_id`, `run_id`, `map_index`) REFERENCES `task_instance` (`dag_id`, `task_id`, `run_id`, `map_index`) ON DELETE CASCADE ON UPDATE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_outlet_asset_reference` (
  `asset_id` int(11) NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `allow_consumer_teams` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`allow_consumer_teams`)),
  `allow_global_consumers` tinyint(1) NOT NULL DEFAULT 1,
  `created_at` timestamp(6) NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  PRIMARY KEY (`asset_id`,`dag_id`,`task_id`),
  KEY `idx_task_outlet_asset_reference_dag_id` (`dag_id`),
  CONSTRAINT `toar_asset_fkey` FOREIGN KEY (`asset_id`) REFERENCES `asset` (`id`) ON DELETE CASCADE,
  CONSTRAINT `toar_dag_id_fkey` FOREIGN KEY (`dag_id`) REFERENCES `dag` (`dag_id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_reschedule` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `ti_id` uuid NOT NULL,
  `start_date` timestamp(6) NOT NULL,
  `end_date` timestamp(6) NOT NULL,
  `duration` int(11) NOT NULL,
  `reschedule_date` timestamp(6) NOT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_task_reschedule_ti_id_id_desc` (`ti_id`,`id` DESC),
  CONSTRAINT `task_reschedule_ti_fkey` FOREIGN KEY (`ti_id`) REFERENCES `task_instance` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `task_state_store` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `dag_run_id` int(11) NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `map_index` int(11) NOT NULL DEFAULT -1,
  `key` varchar(512) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `value` mediumtext NOT NULL,
  `updated_at` timestamp(6) NOT NULL,
  `expires_at` timestamp(6) NULL DEFAULT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `task_state_store_uq` (`dag_run_id`,`task_id`,`map_index`,`key`),
  KEY `idx_task_state_store_expires_at` (`expires_at`),
  KEY `idx_task_state_store_lookup` (`dag_id`,`run_id`,`task_id`,`map_index`),
  CONSTRAINT `task_state_store_dag_run_fkey` FOREIGN KEY (`dag_run_id`) REFERENCES `dag_run` (`id`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `team` (
  `name` varchar(50) NOT NULL,
  PRIMARY KEY (`name`)
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `trigger` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `classpath` varchar(1000) NOT NULL,
  `kwargs` text NOT NULL,
  `created_date` timestamp(6) NOT NULL,
  `triggerer_id` int(11) DEFAULT NULL,
  `queue` varchar(256) DEFAULT NULL,
  `team_name` varchar(50) DEFAULT NULL,
  PRIMARY KEY (`id`),
  KEY `idx_trigger_team_name` (`team_name`),
  CONSTRAINT `trigger_team_name_fkey` FOREIGN KEY (`team_name`) REFERENCES `team` (`name`) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `variable` (
  `id` int(11) NOT NULL AUTO_INCREMENT,
  `key` varchar(250) NOT NULL,
  `val` mediumtext NOT NULL,
  `description` text DEFAULT NULL,
  `is_encrypted` tinyint(1) NOT NULL,
  `team_name` varchar(50) DEFAULT NULL,
  PRIMARY KEY (`id`),
  UNIQUE KEY `variable_key_uq` (`key`),
  KEY `variable_team_name_fkey` (`team_name`),
  CONSTRAINT `variable_team_name_fkey` FOREIGN KEY (`team_name`) REFERENCES `team` (`name`) ON DELETE SET NULL
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40101 SET @saved_cs_client     = @@character_set_client */;
/*!40101 SET character_set_client = utf8mb4 */;
CREATE TABLE `xcom` (
  `dag_run_id` int(11) NOT NULL,
  `task_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `map_index` int(11) NOT NULL DEFAULT -1,
  `key` varchar(512) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `dag_result` tinyint(1) DEFAULT NULL,
  `dag_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `run_id` varchar(250) CHARACTER SET utf8mb3 COLLATE utf8mb3_bin NOT NULL,
  `value` longtext CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT NULL CHECK (json_valid(`value`)),
  `timestamp` timestamp(6) NOT NULL,
  PRIMARY KEY (`dag_run_id`,`task_id`,`map_index`,`key`),
  KEY `idx_xcom_key` (`key`),
  KEY `idx_xcom_task_instance` (`dag_id`,`task_id`,`run_id`,`map_index`),
  CONSTRAINT `xcom_task_instance_fkey` FOREIGN KEY (`dag_id`, `task_id`, `run_id`, `map_index`) REFERENCES `task_instance` (`dag_id`, `task_id`, `run_id`, `map_index`) ON DELETE CASCADE
) ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_unicode_ci;
/*!40101 SET character_set_client = @saved_cs_client */;
/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */;

/*!40101 SET SQL_MODE=@OLD_SQL_MODE */;
/*!40014 SET FOREIGN_KEY_CHECKS=@OLD_FOREIGN_KEY_CHECKS */;
/*!40014 SET UNIQUE_CHECKS=@OLD_UNIQUE_CHECKS */;
/*!40101 SET CHARACTER_SET_CLIENT=@OLD_CHARACTER_SET_CLIENT */;
/*!40101 SET CHARACTER_SET_RESULTS=@OLD_CHARACTER_SET_RESULTS */;
/*!40101 SET COLLATION_CONNECTION=@OLD_COLLATION_CONNECTION */;
/*!40111 SET SQL_NOTES=@OLD_SQL_NOTES */;


/*!40101 SET @OLD_CHARACTER_SET_CLIENT=@@CHARACTER_SET_CLIENT */;
/*!40101 SET @OLD_CHARACTER_SET_RESULTS=@@CHARACTER_SET_RESULTS */;
/*!40101 SET @OLD_COLLATION_CONNECTION=@@COLLATION_CONNECTION */;
/*!40101 SET NAMES utf8mb4 */;
/*!40103 SET @OLD_TIME_ZONE=@@TIME_ZONE */;
/*!40103 SET TIME_ZONE='+00:00' */;
/*!40014 SET @OLD_FOREIGN_KEY_CHECKS=@@FOREIGN_KEY_CHECKS, FOREIGN_KEY_CHECKS=0 */;
/*!40101 SET @OLD_SQL_MODE=@@SQL_MODE, SQL_MODE='NO_AUTO_VALUE_ON_ZERO' */;
/*!40111 SET @OLD_SQL_NOTES=@@SQL_NOTES, SQL_NOTES=0 */;

LOCK TABLES `alembic_version` WRITE;
/*!40000 ALTER TABLE `alembic_version` DISABLE KEYS */;
INSERT INTO `alembic_version` VALUES
('d2f4e1b3c5a7');
/*!40000 ALTER TABLE `alembic_version` ENABLE KEYS */;
UNLOCK TABLES;
/*!40103 SET TIME_ZONE=@OLD_TIME_ZONE */;

/*!40101 SET SQL_MODE=@OLD_SQL_MODE */;
/*!40014 SET FOREIGN_KEY_CHECKS=@OLD_FOREIGN_KEY_CHECKS */;
/*!40101 SET CHARACTER_SET_CLIENT=@OLD_CHARACTER_SET_CLIENT */;
/*!40101 SET CHARACTER_SET_RESULTS=@OLD_CHARACTER_SET_RESULTS */;
/*!40101 SET COLLATION_CONNECTION=@OLD_COLLATION_CONNECTION */;
/*!40111 SET SQL_NOTES=@OLD_SQL_NOTES */;

